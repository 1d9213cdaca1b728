import json
import math

import pytest
import torch

from selfie_core import (GenerationConfig, InjectionConfig, InterpretationTemplate, InterpretRequest, SelfieEngine,
                         SelfieInputError, VectorRequest, to_dataframe)
from selfie_core.reference import reference_interpret

PROMPTS = ["The Eiffel Tower is located in Paris, the capital of France.", "A quick fox.", "Water is made of hydrogen"]
GEN = GenerationConfig(max_new_tokens=8)


def requests_for(tokenizer, prompts=PROMPTS, layers=(0, 1, 3, 4)):
    reqs = []
    for p in prompts:
        n = len(tokenizer(p).input_ids)
        for layer in layers:
            for t in sorted({0, 1, n // 2, n - 1}):
                reqs.append(InterpretRequest(p, layer, t, key=(p[:5], layer, t)))
    return reqs


def assert_same(a, b, tol=1e-9):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x.key, x.prompt, x.layer, x.token) == (y.key, y.prompt, y.layer, y.token)
        assert x.token_ids == y.token_ids, (x.layer, x.token, x.text, y.text)
        assert x.text == y.text
        assert len(x.relevancy) == len(x.token_ids)
        assert max((abs(p - q) for p, q in zip(x.relevancy, y.relevancy)), default=0) <= tol


@pytest.mark.parametrize("injection", [InjectionConfig(k=1), InjectionConfig(k=2, mode="blend", strength=0.5),
                                       InjectionConfig(k=0, mode="add", strength=2.0)])
def test_engine_matches_reference(engine, llama, tokenizer, injection):
    reqs = requests_for(tokenizer)
    ours = engine.interpret(reqs, injection=injection, generation=GEN)
    ref = reference_interpret(llama, tokenizer, reqs, None, injection, GEN, batch_size=64)
    assert_same(ours, ref)
    assert any(r.mean_relevancy > 1e-3 for r in ours)


def test_engine_matches_reference_with_eos_and_chat_template(engine, llama, tokenizer):
    template = InterpretationTemplate.preset("summarize", tokenizer)
    reqs = requests_for(tokenizer)
    free = engine.interpret(reqs, template=template, generation=GEN)
    # pick a token generated mid-sequence by some rows as EOS so that rows stop at different steps
    counts = {}
    for r in free:
        for t in set(r.token_ids[1:-1]):
            counts[t] = counts.get(t, 0) + 1
    eos = min(counts, key=lambda t: abs(counts[t] - len(free) / 2))
    gen = GenerationConfig(max_new_tokens=8, eos_token_ids=(eos,))
    ours = engine.interpret(reqs, template=template, generation=gen, batch_size=5)
    lengths = {len(r.token_ids) for r in ours}
    assert len(lengths) > 1 and any(r.token_ids[-1] == eos for r in ours)
    assert all(eos not in r.token_ids[:-1] for r in ours)
    assert_same(ours, reference_interpret(llama, tokenizer, reqs, template, InjectionConfig(), gen, batch_size=7))


def test_gpt2_layout_matches_reference(gpt2, tokenizer):
    eng = SelfieEngine(gpt2, tokenizer)
    reqs = requests_for(tokenizer, layers=(0, 2, 3))
    assert_same(eng.interpret(reqs, generation=GEN), reference_interpret(gpt2, tokenizer, reqs, None, None, GEN))


def test_neox_layout_runs(neox, tokenizer):
    eng = SelfieEngine(neox, tokenizer)
    reqs = requests_for(tokenizer, prompts=PROMPTS[:1], layers=(1,))
    assert_same(eng.interpret(reqs, generation=GEN), reference_interpret(neox, tokenizer, reqs, None, None, GEN))


def test_batch_size_and_packing_do_not_change_results(engine, tokenizer):
    reqs = requests_for(tokenizer)
    full = engine.interpret(reqs, generation=GEN, batch_size=len(reqs))
    assert_same(engine.interpret(reqs[::3], generation=GEN, batch_size=1), full[::3])
    assert_same(engine.interpret(reqs, generation=GEN, batch_size=7), full)
    # different packing: each prompt alone, and a shuffled interleaving of all prompts
    by_key = {r.key: r for r in full}
    for p in PROMPTS:
        alone = engine.interpret([r for r in reqs if r.prompt == p], generation=GEN)
        assert_same(alone, [by_key[r.key] for r in alone])
    shuffled = reqs[::-1][::2] + reqs[::-1][1::2]
    assert_same(engine.interpret(shuffled, generation=GEN, batch_size=9), [by_key[r.key] for r in shuffled])


def test_injecting_the_placeholders_own_state_changes_nothing(engine, tokenizer):
    template = InterpretationTemplate(("[INST] ", 0, " [/INST] Sure"))
    prepared = template.prepare(tokenizer)
    assert len(prepared.insert_positions) == 1
    k = 2
    req = InterpretRequest(prepared.text, layer=k, token=prepared.insert_positions[0])
    [res] = engine.interpret([req], template=template, injection=InjectionConfig(k=k), generation=GEN)
    # no-injection generation: blend with strength 0 leaves the prompt as it is
    [plain] = engine.interpret([req], template=template, injection=InjectionConfig(k=k, mode="blend", strength=0.0),
                               generation=GEN)
    assert res.token_ids == plain.token_ids
    assert max(res.relevancy) < 1e-9


def test_blend_strength_zero_gives_zero_relevancy(engine, tokenizer):
    reqs = requests_for(tokenizer)[:10]
    for k in (0, 3):
        results = engine.interpret(reqs, injection=InjectionConfig(k=k, mode="blend", strength=0.0), generation=GEN)
        assert all(max(r.relevancy) < 1e-9 and r.mean_relevancy < 1e-9 for r in results)
        assert len({tuple(r.token_ids) for r in results}) == 1  # every row generates the uninjected text


def test_results_keep_keys_order_and_records(engine, tokenizer):
    reqs = requests_for(tokenizer)
    batches = list(engine.stream(reqs, generation=GEN, batch_size=10))
    assert [len(b) for b in batches] == [10] * (len(reqs) // 10) + ([len(reqs) % 10] if len(reqs) % 10 else [])
    flat = [r for b in batches for r in b]
    assert [r.key for r in flat] == [r.key for r in reqs]
    ids = tokenizer(PROMPTS[0]).input_ids
    first = flat[0]
    assert first.source_token == tokenizer.decode([ids[first.token]])
    assert math.isclose(first.mean_relevancy, sum(first.relevancy) / len(first.relevancy))
    assert json.loads(json.dumps(first.to_dict()))["key"] == list(first.key)
    df = to_dataframe(flat)
    assert len(df) == len(reqs) and {"layer", "token", "text", "mean_relevancy", "key"} <= set(df.columns)
    assert df.iloc[0]["key"] == first.key


def test_interpret_vectors_equals_extracted_path(engine, llama, tokenizer):
    p = PROMPTS[0]
    ids = tokenizer(p).input_ids
    with torch.no_grad():
        hs = llama(torch.tensor([ids]), output_hidden_states=True).hidden_states
    reqs = [InterpretRequest(p, 2, 5, key="a"), InterpretRequest(p, 3, 7, key="b")]
    direct = engine.interpret(reqs, generation=GEN)
    vecs = engine.interpret_vectors([VectorRequest(hs[2][0, 5], key="a", label="v1"), hs[3][0, 7].tolist()],
                                    generation=GEN)
    assert vecs[0].token_ids == direct[0].token_ids and vecs[1].token_ids == direct[1].token_ids
    assert vecs[0].key == "a" and vecs[0].prompt == "v1" and vecs[0].layer is None and vecs[1].prompt == ""
    mixed = engine.interpret([reqs[0], VectorRequest(hs[3][0, 7], key="b")], generation=GEN)
    assert [m.token_ids for m in mixed] == [d.token_ids for d in direct]


def test_hidden_states_are_the_forward_pass_hidden_states(engine, llama, tokenizer):
    """`hidden_states` (what a vectors job's expressions are built from) is hidden_states[L][t] of the prompt run
    alone, for negative tokens too, batched across prompts of different lengths."""
    wanted = {PROMPTS[0]: [(2, 5), (0, -1), (4, 0)], PROMPTS[1]: [(3, -2)]}
    got = engine.hidden_states(wanted)
    for prompt, pairs in wanted.items():
        with torch.no_grad():
            hs = llama(torch.tensor([tokenizer(prompt).input_ids]), output_hidden_states=True).hidden_states
        for layer, token in pairs:
            assert torch.allclose(got[prompt][(layer, token)], hs[layer][0, token], atol=1e-5)
    with pytest.raises(SelfieInputError, match="layer"):
        engine.hidden_states({PROMPTS[1]: [(99, 0)]})
    with pytest.raises(SelfieInputError, match="token"):
        engine.hidden_states({PROMPTS[1]: [(1, -99)]})


def test_sampling_is_reproducible(engine, tokenizer):
    reqs = requests_for(tokenizer)[:12]
    gen = GenerationConfig(max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.9, seed=123)
    a = engine.interpret(reqs, generation=gen, batch_size=12)
    b = engine.interpret(reqs, generation=gen, batch_size=5)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    c = engine.interpret(reqs, generation=GenerationConfig(max_new_tokens=8, do_sample=True, temperature=1.5,
                                                           top_p=0.9, seed=124))
    assert [r.token_ids for r in a] != [r.token_ids for r in c]
    greedy = engine.interpret(reqs, generation=GEN)
    assert [r.token_ids for r in a] != [r.token_ids for r in greedy]


def test_hooks_removed_when_generation_raises(engine, tokenizer):
    """A failure in the middle of the injected prefill leaves no hook and no replaced forward behind."""
    blocks, k = engine.adapter.blocks, 2
    engine.interpret(requests_for(tokenizer)[:1], generation=GEN)  # transformers installs its output hooks once
    before = [(len(b._forward_pre_hooks), len(b._forward_hooks)) for b in blocks]
    during = []

    def explode(module, args, kwargs):
        if len(blocks[k]._forward_pre_hooks) > before[k][0]:  # only in the prefill, where the engine's hooks are
            during.append([("forward" in b.__dict__) for b in blocks[:k]])
            raise RuntimeError("device lost")

    handle = blocks[-1].register_forward_pre_hook(explode, with_kwargs=True)
    try:
        with pytest.raises(RuntimeError, match="device lost"):
            engine.interpret(requests_for(tokenizer)[:3], injection=InjectionConfig(k=k), generation=GEN)
    finally:
        handle.remove()
    assert during == [[True] * k]  # it failed while the blocks below k were skipped
    assert [(len(b._forward_pre_hooks), len(b._forward_hooks)) for b in blocks] == before
    assert not any("forward" in b.__dict__ for b in blocks)
    engine.interpret(requests_for(tokenizer)[:2], generation=GEN)  # still usable


def test_empty_request_list(engine):
    assert engine.interpret([]) == []


def test_identical_vectors_are_run_once_with_identical_results(engine, tokenizer):
    # BOS (token 0) has the same hidden states in every prompt; the rows are deduplicated inside a batch
    reqs = [InterpretRequest(p, layer, 0, key=(p, layer)) for p in PROMPTS for layer in (1, 3)]
    reqs.append(InterpretRequest(PROMPTS[0], 2, 4, key="other"))
    results = engine.interpret(reqs, generation=GEN)
    for layer in (1, 3):
        same = [r for r in results if r.layer == layer]
        assert len({tuple(r.token_ids) for r in same}) == 1 and len({tuple(r.relevancy) for r in same}) == 1
        assert same[0].token_ids is not same[1].token_ids
    alone = engine.interpret([reqs[0]], generation=GEN)[0]
    assert alone.token_ids == results[0].token_ids


def test_threads_sharing_a_model_get_what_they_get_alone(engine, tokenizer):
    """The engine hooks the model for each batch; threads that share it take turns instead of mixing hooks."""
    from concurrent.futures import ThreadPoolExecutor

    jobs = [(requests_for(tokenizer)[i::3], InjectionConfig(k=1 + i % 2)) for i in range(3)]
    alone = [[r.token_ids for r in engine.interpret(reqs, injection=inj, generation=GEN)] for reqs, inj in jobs]
    with ThreadPoolExecutor(3) as pool:
        for _ in range(4):
            futures = [pool.submit(engine.interpret, reqs, injection=inj, generation=GEN) for reqs, inj in jobs]
            assert [[r.token_ids for r in f.result()] for f in futures] == alone


def test_a_sliding_window_model_matches_reference_or_is_refused(tokenizer):
    """The engine's cache and masks assume every position sees the whole interpretation prompt and the tokens
    generated before it: within a sliding window it matches the reference; past it, a clear error."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(5)
    cfg = MistralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        sliding_window=1000, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, initializer_range=0.2)
    model = MistralForCausalLM(cfg).to(torch.float64).eval()
    reqs = requests_for(tokenizer, prompts=PROMPTS[:2], layers=(1, 3))
    eng = SelfieEngine(model, tokenizer)
    assert_same(eng.interpret(reqs, generation=GEN), reference_interpret(model, tokenizer, reqs, None, None, GEN))
    length = len(InterpretationTemplate().prepare(tokenizer).input_ids)
    model.config.sliding_window = length + GEN.max_new_tokens - 1
    with pytest.raises(SelfieInputError, match=f"sliding attention window of {length + 7} tokens"):
        eng.interpret(reqs, generation=GEN)
    model.config.sliding_window += 1
    eng.validate(reqs, generation=GEN)
