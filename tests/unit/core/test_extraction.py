"""Index conventions: layer L = hidden_states[L] (0 = embeddings, L = input of block L); token t indexes
tokenizer(prompt).input_ids; batching with padding changes nothing."""

import torch

from selfie_core.adapters import get_adapter
from selfie_core.extraction import extract

PROMPTS = ["The Eiffel Tower is located in Paris, the capital of France.", "A fox.", "Water is made of hydrogen"]


def test_layer_zero_is_embeddings_and_layer_l_is_block_input(llama, tokenizer):
    ids = tokenizer(PROMPTS[0]).input_ids
    assert ids[0] == tokenizer.bos_token_id  # special tokens count, as the tokenizer adds them
    adapter = get_adapter(llama)
    inputs = {}
    handles = [b.register_forward_pre_hook(lambda m, a, kw, i=i: inputs.__setitem__(i, a[0].clone()), with_kwargs=True)
               for i, b in enumerate(adapter.blocks)]
    try:
        with torch.no_grad():
            ref = llama(torch.tensor([ids]), output_hidden_states=True).hidden_states
    finally:
        for h in handles:
            h.remove()
    assert len(ref) == adapter.num_layers + 1
    wanted = [(layer, t) for layer in range(adapter.num_layers + 1) for t in (0, 3, len(ids) - 1)]
    got = extract(llama, [ids], [wanted], tokenizer.pad_token_id, torch.device("cpu"))[0]
    emb = adapter.embeddings(torch.tensor([ids]))
    for layer, t in wanted:
        assert torch.equal(got[(layer, t)], ref[layer][0, t])
        if layer == 0:
            assert torch.allclose(got[(layer, t)], emb[0, t])
        if layer < adapter.num_layers:
            assert torch.allclose(got[(layer, t)], inputs[layer][0, t])


def test_batched_extraction_with_padding_matches_single(llama, tokenizer):
    ids = [tokenizer(p).input_ids for p in PROMPTS]
    wanted = [[(layer, t) for layer in (0, 2, 4) for t in range(len(i))] for i in ids]
    batched = extract(llama, ids, wanted, tokenizer.pad_token_id, torch.device("cpu"))
    for i in range(len(ids)):
        single = extract(llama, [ids[i]], [wanted[i]], tokenizer.pad_token_id, torch.device("cpu"))[0]
        for key, vec in single.items():
            assert torch.allclose(batched[i][key], vec, atol=1e-10)
    tiny_budget = extract(llama, ids, wanted, tokenizer.pad_token_id, torch.device("cpu"), max_batch_tokens=8)
    for i in range(len(ids)):
        for key, vec in tiny_budget[i].items():
            assert torch.allclose(batched[i][key], vec, atol=1e-10)


def test_last_layer_is_what_hugging_face_returns_after_the_final_norm(llama, gpt2, tokenizer):
    """hidden_states[num_layers] is the *output* of the final norm in current transformers (LLaMA and GPT-2)."""
    ids = tokenizer(PROMPTS[0]).input_ids
    for model in (llama, gpt2):
        adapter = get_adapter(model)
        seen = {}
        handle = adapter.final_norm.register_forward_hook(lambda m, a, o: seen.__setitem__("out", o))
        try:
            got = extract(model, [ids], [[(adapter.num_layers, 2)]], tokenizer.pad_token_id, torch.device("cpu"))[0]
        finally:
            handle.remove()
        assert torch.allclose(got[(adapter.num_layers, 2)], seen["out"][0, 2])
