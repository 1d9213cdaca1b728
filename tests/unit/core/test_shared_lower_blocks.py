"""The prefill may skip the blocks below k (their states are the prompt run's): identical to running them."""

import dataclasses

import pytest
import torch

from selfie_core import GenerationConfig, InjectionConfig, InterpretationTemplate, InterpretRequest, SelfieEngine
from selfie_core.generation import generate_batch, prepare_prompt_state


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("parts", [None, (0, 0, " Sure, I will summarize the message:")])
@pytest.mark.parametrize("no_bos", [False, True])
def test_skipping_lower_blocks_matches_running_them(llama, tokenizer, k, parts, no_bos):
    template = InterpretationTemplate() if parts is None else InterpretationTemplate(parts=parts)
    prepared = template.prepare(tokenizer)
    if no_bos:  # as with a tokenizer that adds no BOS: no shared prefix at all when a placeholder comes first
        prepared = dataclasses.replace(prepared, input_ids=prepared.input_ids[1:],
                                       insert_positions=tuple(p - 1 for p in prepared.insert_positions))
    state = prepare_prompt_state(llama, prepared, torch.device("cpu"))
    blocks = llama.model.layers
    torch.manual_seed(k)
    vectors = torch.randn(6, llama.config.hidden_size, dtype=torch.float64) * 3
    plain = generate_batch(llama, blocks[k], state, vectors, mode="blend", strength=0.7, max_new_tokens=8,
                           eos_ids=[], device=torch.device("cpu"))
    # an EOS that some rows emit, so that rows leave the batch at different steps
    eos = plain[0].token_ids[3]
    plain = generate_batch(llama, blocks[k], state, vectors, mode="blend", strength=0.7, max_new_tokens=8,
                           eos_ids=[eos], device=torch.device("cpu"))
    shared = generate_batch(llama, blocks[k], state, vectors, mode="blend", strength=0.7, max_new_tokens=8,
                            eos_ids=[eos], device=torch.device("cpu"), lower_blocks=list(blocks[:k]))
    assert len(plain[0].token_ids) <= 4 and plain[0].token_ids[-1] == eos
    for a, b in zip(plain, shared):
        assert a.token_ids == b.token_ids
        assert max(abs(x - y) for x, y in zip(a.p_inject, b.p_inject)) < 1e-9
    assert all("forward" not in b.__dict__ and not b._forward_pre_hooks for b in blocks)


def test_a_forward_of_the_blocks_own_survives_skipping(llama, tokenizer):
    """Under ``device_map`` accelerate wraps each block's forward on the instance; skipping must put it back."""
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    class Counting(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            Counting.calls += 1
            return args, kwargs

    block = llama.model.layers[0]
    requests = [InterpretRequest("The Eiffel Tower is in Paris", 2, 3)]
    injection, generation = InjectionConfig(k=2), GenerationConfig(max_new_tokens=4)
    plain = SelfieEngine(llama, tokenizer).interpret(requests, injection=injection, generation=generation)
    add_hook_to_module(block, Counting())
    try:
        wrapped = block.__dict__["forward"]
        hooked = SelfieEngine(llama, tokenizer).interpret(requests, injection=injection, generation=generation)
        assert block.__dict__.get("forward") is wrapped
        before = Counting.calls
        llama(torch.tensor([[1, 2, 3]]))
        assert Counting.calls == before + 1
    finally:
        remove_hook_from_module(block)
        block.__dict__.pop("forward", None)  # accelerate leaves the class's forward bound on the instance
    assert [r.token_ids for r in hooked] == [r.token_ids for r in plain]
