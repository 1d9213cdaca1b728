"""The Triton single-query attention of static decode steps computes what SDPA computes.

On a machine without CUDA, Triton's interpreter runs the same kernel on the CPU (TRITON_INTERPRET=1, set by this
folder's conftest); with CUDA the compiled kernel runs on the GPU. The engine's CUDA graphs through the kernel are
checked against eager SDPA steps in test_decoding.py.
"""

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from selfie_core import GenerationConfig, InterpretationTemplate, InterpretRequest, SelfieEngine
from selfie_core import triton_attention
from selfie_core.adapters import get_adapter
from selfie_core.generation import generate_batch, prepare_prompt_state

from .conftest import _llama, compile_for_gpus

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _reference(query, key, value, visible, scale):
    """float64 SDPA over the key/value heads repeated for their query heads, in the kernel's output layout."""
    group = query.shape[1] // key.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(
        query.double(), key.double().repeat_interleave(group, 1), value.double().repeat_interleave(group, 1),
        attn_mask=visible[:, None, None, :], scale=scale)
    return out.transpose(1, 2)


def _relative_error(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("length", [37, 300])  # one block of positions; several (the online softmax rescales)
def test_kernel_matches_a_float64_reference(dtype, tolerance, length):
    generator = torch.Generator().manual_seed(length)
    batch, heads, kv_heads, dim = 3, 6, 2, 24  # grouped-query heads, a head size that is no power of two

    def draw(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(DEVICE, dtype)

    query, key, value = draw(batch, heads, 1, dim), draw(batch, kv_heads, length, dim), draw(batch, kv_heads, length, dim)
    scale = dim ** -0.5
    # one row per way a cache can look: holes, a short visible prefix (whole blocks hidden after it), all visible
    visible = torch.rand(batch, length, generator=generator) < 0.5
    visible[0, 0] = True
    visible[1] = torch.arange(length) < 9
    visible[2] = True
    visible = visible.to(DEVICE)
    got = triton_attention.single_query_attention(query, key, value, visible, scale)
    assert got.shape == (batch, 1, heads, dim) and got.dtype == dtype
    assert _relative_error(got, _reference(query, key, value, visible, scale)) < tolerance
    # a mask shared by every row, as a static decode step passes it (an expand: stride 0 over rows)
    shared = visible[1:2].expand(batch, -1)
    got = triton_attention.single_query_attention(query, key, value, shared, scale)
    assert _relative_error(got, _reference(query, key, value, shared, scale)) < tolerance


def test_kernel_compiles_to_gpu_machine_code():
    """Every dtype the engine loads models in, at the 7B-shaped step's sizes."""
    printed = compile_for_gpus("triton_attention", {"LENGTH": 40, "GROUP": 1, "HEAD_DIM": 128, "BLOCK_D": 128,
                                                    "BLOCK_L": 32},
                               scalars={"scale": "fp32"}, pointers={"mask_ptr": "*u8"}, precision="ACC")
    assert printed.count("bytes of cubin") == 8, printed


def test_kernel_refuses_shapes_it_does_not_compute():
    query, key = torch.randn(2, 4, 2, 8, device=DEVICE), torch.randn(2, 2, 5, 8, device=DEVICE)
    visible = torch.ones(2, 5, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match="single-query"):
        triton_attention.single_query_attention(query, key, key, visible, 1.0)
    with pytest.raises(ValueError, match="visible must be"):
        triton_attention.single_query_attention(query[:, :, :1], key, key, visible.float(), 1.0)


def test_what_the_kernel_does_not_cover_goes_to_sdpa_unchanged(llama):
    module = llama.model.layers[0].self_attn
    query = torch.randn(2, 4, 3, 16, dtype=torch.float64)
    key, value = torch.randn(2, 2, 5, 16, dtype=torch.float64), torch.randn(2, 2, 5, 16, dtype=torch.float64)
    causal = torch.ones(3, 5, dtype=torch.bool).tril(2).expand(2, 1, 3, 5)
    additive = torch.zeros(2, 1, 1, 5, dtype=torch.float64)
    cases = [(query, causal, {}),  # three queries
             (query[:, :, :1], additive, {}),  # a float mask
             (query[:, :, :1], causal[:, :, :1], {"dropout": 0.1})]
    for q, mask, extra in cases:
        torch.manual_seed(0)
        got, _ = triton_attention.attention_forward(module, q, key, value, mask, **extra)
        torch.manual_seed(0)
        want, _ = sdpa_attention_forward(module, q, key, value, mask, **extra)
        assert torch.equal(got, want)


def _static_run(model, tokenizer, attention):
    prepared = InterpretationTemplate().prepare(tokenizer)
    state = prepare_prompt_state(model, prepared, DEVICE)
    torch.manual_seed(3)
    vectors = torch.randn(6, model.config.hidden_size, dtype=next(model.parameters()).dtype).to(DEVICE) * 3
    return generate_batch(model, get_adapter(model).blocks[1], state, vectors, mode="replace", strength=1.0,
                          max_new_tokens=8, eos_ids=[], device=DEVICE, decode="static", decode_attention=attention)


def test_static_steps_through_the_kernel_give_what_sdpa_steps_give(tokenizer, monkeypatch):
    model = _llama(tokenizer).to(DEVICE)
    calls = []
    kernel = triton_attention.single_query_attention

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return kernel(*args, **kwargs)

    sdpa_rows = _static_run(model, tokenizer, "sdpa")
    assert not calls
    monkeypatch.setattr(triton_attention, "single_query_attention", counted)
    triton_rows = _static_run(model, tokenizer, "triton")
    assert len(calls) == model.config.num_hidden_layers * 7  # every layer of the 7 steps after the prefill
    assert model.config._attn_implementation == "sdpa"  # the model's own attention outside the steps
    assert [r.token_ids for r in sdpa_rows] == [r.token_ids for r in triton_rows]
    for a, b in zip(sdpa_rows, triton_rows):
        assert max(abs(x - y) for x, y in zip(a.p_inject, b.p_inject)) < 1e-9  # float64 model


def test_models_on_other_attention_keep_it(tokenizer):
    model = _llama(tokenizer, layers=2, seed=4)
    model.set_attn_implementation("eager")
    with triton_attention.selected(model):
        assert model.config._attn_implementation == "eager"
    model.set_attn_implementation("sdpa")
    with pytest.raises(KeyError), triton_attention.selected(model):
        assert model.config._attn_implementation == triton_attention.NAME
        raise KeyError("an error inside the block")
    assert model.config._attn_implementation == "sdpa"


def test_decode_attention_is_checked_and_is_a_no_op_on_growing_steps(llama, tokenizer):
    with pytest.raises(ValueError, match="decode attention must be one of"):
        SelfieEngine(llama, tokenizer, decode_attention="flash")
    with pytest.raises(ValueError, match="decode attention must be one of"):
        _static_run(llama, tokenizer, "cudnn")
    requests = [InterpretRequest("The Eiffel Tower is located in Paris", layer, 3) for layer in (1, 2)]
    gen = GenerationConfig(max_new_tokens=5)
    plain = SelfieEngine(llama, tokenizer).interpret(requests, generation=gen)
    chosen = SelfieEngine(llama, tokenizer, decode_attention="triton")
    assert chosen.decode_attention == "triton"
    assert [r.token_ids for r in chosen.interpret(requests, generation=gen)] == [r.token_ids for r in plain]
