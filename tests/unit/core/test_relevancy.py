"""The prefix-tree packed no-inject pass equals a plain teacher-forced run of every row."""

import random

import torch

from selfie_core import InterpretationTemplate
from selfie_core.generation import prepare_prompt_state
from selfie_core.relevancy import _pack, no_inject_probs


def plain_probs(model, prompt_ids, seq):
    ids = torch.tensor([list(prompt_ids) + list(seq)])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt_ids) - 1 : -1].double()
    return torch.softmax(logits, -1).gather(-1, torch.tensor(seq)[:, None])[:, 0].tolist()


def test_tree_packing_matches_plain_teacher_forcing(llama, gpt2, tokenizer):
    rnd = random.Random(0)
    base = [rnd.randrange(5, 300) for _ in range(9)]
    seqs = [base, base[:4] + [7, 8, 9], base[:2], base[:1], [11], base + [5], [12, 13, 14, 15], base[:4] + [7, 8, 9]]
    seqs += [[rnd.randrange(5, 300) for _ in range(rnd.randrange(1, 10))] for _ in range(12)]
    prepared = InterpretationTemplate().prepare(tokenizer)
    for model in (llama, gpt2):
        state = prepare_prompt_state(model, prepared, torch.device("cpu"))
        for width, max_elems in ((256, 1 << 27), (12, 1 << 27), (9, 5000)):
            got = no_inject_probs(model, state, seqs, torch.device("cpu"), lane_width=width, max_logit_elements=max_elems)
            for seq, probs in zip(seqs, got):
                assert len(probs) == len(seq)
                assert torch.allclose(torch.tensor(probs), torch.tensor(plain_probs(model, prepared.input_ids, seq)),
                                      atol=1e-10)


def test_eager_attention_mask_and_plain_fallback(tokenizer):
    from selfie_core.relevancy import _plain_pass
    from tests.unit.core.conftest import _llama

    model = _llama(tokenizer, layers=2, seed=3)
    model.config._attn_implementation = "eager"  # eager adds the mask to the scores: a bool mask would be wrong
    prepared = InterpretationTemplate().prepare(tokenizer)
    state = prepare_prompt_state(model, prepared, torch.device("cpu"))
    seqs = [[5, 6, 7, 8], [5, 6, 9], [10, 11], [12]]
    want = [plain_probs(model, prepared.input_ids, s) for s in seqs]
    tree = no_inject_probs(model, state, seqs, torch.device("cpu"))
    plain = _plain_pass(model, state, seqs, [0, 1, 2], [[float(state.last_probs[s[0]])] for s in seqs],
                        torch.device("cpu"), 1 << 27)  # what attention kernels without custom masks use
    for got in (tree, plain):
        for g, w in zip(got, want):
            assert torch.allclose(torch.tensor(g), torch.tensor(w), atol=1e-10)


def test_pack_shares_prefixes():
    seqs = [[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 6, 7], [9, 9]]
    lanes = _pack(seqs, [0, 1, 2, 3], width=100)
    assert len(lanes) == 1
    # inputs are the sequences without their last token: 1-2-3, 1-2-6 (shared 1-2) and 9
    assert sorted(lanes[0]["tokens"]) == [1, 2, 3, 6, 9]
    assert len(_pack(seqs, [0, 1, 2, 3], width=3)) == 3
