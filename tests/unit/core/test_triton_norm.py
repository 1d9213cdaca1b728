"""The Triton RMSNorm computes what the models' own RMSNorm modules compute.

Without CUDA, Triton's interpreter runs the kernel on the CPU (TRITON_INTERPRET=1, set by this folder's conftest).
"""

import importlib

import pytest
import torch

from selfie_core import GenerationConfig, InjectionConfig, InterpretRequest, SelfieEngine, triton_norm

from .conftest import _llama, compile_for_gpus

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# A bf16 result may be one step (2**-7 relative) off before the weight's multiply rounds it again: the sum of
# squares adds up in another order, and Triton's interpreter truncates float32 -> bf16 where compiled kernels (and
# torch) round to nearest even
BF16_TOLERANCE = 2 * 2 ** -7
MODULES = {"LlamaRMSNorm": "llama", "MistralRMSNorm": "mistral", "Qwen2RMSNorm": "qwen2", "Qwen3RMSNorm": "qwen3",
           "Phi3RMSNorm": "phi3", "GraniteRMSNorm": "granite"}


def _norm_class(name):
    module = importlib.import_module(f"transformers.models.{MODULES[name]}.modeling_{MODULES[name]}")
    return getattr(module, name)


def test_every_listed_class_is_known_here():
    assert set(MODULES) == set(triton_norm.CLASSES)


@pytest.mark.parametrize("name", sorted(triton_norm.CLASSES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_fused_norm_gives_the_modules_own_output(name, dtype):
    generator = torch.Generator().manual_seed(len(name))
    width = 96  # no power of two: the kernel's block is wider than a row
    module = _norm_class(name)(width, eps=1e-5).to(DEVICE, dtype)
    with torch.no_grad():
        module.weight.copy_(torch.randn(width, generator=generator).to(DEVICE, dtype))
    hidden = (torch.randn(3, 7, width, generator=generator, dtype=torch.float64) * 4).to(DEVICE, dtype)
    want = module(hidden)
    model = torch.nn.Sequential(module)
    with triton_norm.fused(model) as count:
        got = module(hidden)
    assert count == 1
    assert "forward" not in module.__dict__  # its own forward again
    assert got.dtype == want.dtype and got.shape == want.shape
    # the same operations in the same precisions; only the order of the sum of squares differs
    tolerance = {torch.float32: 1e-6, torch.float64: 1e-6, torch.bfloat16: BF16_TOLERANCE}[dtype]
    assert ((got - want).abs() <= tolerance * want.abs().clamp_min(1.0)).all()
    if dtype == torch.bfloat16 and DEVICE.type == "cuda":  # rounding to bf16 hides the order of the sum
        assert (got == want).float().mean() > 0.99


def test_a_float32_weight_on_bf16_activations_promotes_like_the_module():
    module = _norm_class("LlamaRMSNorm")(64).to(DEVICE)
    hidden = torch.randn(5, 64, device=DEVICE).to(torch.bfloat16)
    want = module(hidden)
    got = triton_norm.rms_norm(hidden, module.weight, module.variance_epsilon)
    assert got.dtype == want.dtype == torch.float32
    assert ((got - want).abs() <= BF16_TOLERANCE * want.abs().clamp_min(1.0)).all()


def test_norms_of_other_formulas_keep_their_forward():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm

    model = torch.nn.Sequential(GemmaRMSNorm(8), Olmo2RMSNorm(8), _norm_class("LlamaRMSNorm")(8))
    with triton_norm.fused(model) as count:
        assert count == 1
        assert [("forward" in m.__dict__) for m in model] == [False, False, True]


def test_a_norm_with_a_forward_of_its_own_keeps_it():
    """accelerate's device-alignment wrapper (``device_map``) lives on the instance; fusing must not drop it."""
    model = torch.nn.Sequential(*(_norm_class("LlamaRMSNorm")(8) for _ in range(2)))
    wrapped = model[0].forward
    model[0].forward = wrapped  # an instance attribute, as accelerate's add_hook_to_module leaves it
    with triton_norm.fused(model) as count:
        assert count == 1
        assert model[0].__dict__["forward"] is wrapped and "forward" in model[1].__dict__
    assert model[0].__dict__["forward"] is wrapped and "forward" not in model[1].__dict__


def test_the_engine_with_fused_norms_gives_the_same_interpretations(tokenizer, monkeypatch):
    model = _llama(tokenizer, layers=3, seed=2).to(DEVICE, torch.float32)
    calls = []
    kernel = triton_norm.rms_norm

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return kernel(*args, **kwargs)

    requests = [InterpretRequest("The Eiffel Tower is located in Paris", layer, t) for layer in (0, 2) for t in (2, 4)]
    gen, injection = GenerationConfig(max_new_tokens=6), InjectionConfig(k=1)
    plain = SelfieEngine(model, tokenizer).interpret(requests, injection=injection, generation=gen)
    monkeypatch.setattr(triton_norm, "rms_norm", counted)
    got = SelfieEngine(model, tokenizer, rms_norm="triton").interpret(requests, injection=injection, generation=gen)
    assert calls  # the prefill, the decode steps and the no-inject pass went through the kernel
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert [r.token_ids for r in got] == [r.token_ids for r in plain]
    for a, b in zip(got, plain):
        assert max(abs(x - y) for x, y in zip(a.relevancy, b.relevancy)) < 1e-5


def test_rms_norm_choice_is_checked(llama, tokenizer, monkeypatch):
    with pytest.raises(ValueError, match="rms_norm must be one of"):
        SelfieEngine(llama, tokenizer, rms_norm="fast")
    if DEVICE.type != "cuda":  # a CPU engine outside the interpreter would fail at its first batch: refused at once
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="runs on CUDA devices"):
            SelfieEngine(llama, tokenizer, rms_norm="triton")


def test_kernel_compiles_to_gpu_machine_code():
    """As for the attention kernel, at the 7B model's width."""
    printed = compile_for_gpus("triton_norm", {"WIDTH": 4096, "BLOCK": 4096}, scalars={"eps": "fp32"}, pointers={},
                               precision="PRODUCT")
    assert printed.count("bytes of cubin") == 8, printed
