"""The prefill may skip the blocks below k (their states are the prompt run's): identical to running them."""

import dataclasses

import pytest
import torch

from selfie_core import InterpretationTemplate
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
