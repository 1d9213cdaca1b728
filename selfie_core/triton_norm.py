"""RMSNorm as one Triton kernel (opt-in; CUDA).

LLaMA-family models normalise twice per block (``LlamaRMSNorm``): an upcast to float32, the mean of squares,
rsqrt, a multiply, a downcast and the weight's multiply, each its own kernel reading and writing the whole
activation. On a 7B-shaped batch of 640 rows that is eight passes over 5-10 MB where one read and one write would
do, 65 times per decode step, and the same over the ~11,000 positions of the prefill and the no-inject pass; the
profile put such element-wise kernels at about 0.25 s of a 1.45 s run (benchmarks/README.md).

``fused(model)`` gives every RMSNorm module of a known class a forward that runs this kernel for as long as the
block runs, and gives the modules their own forward back after it. The kernel computes what those classes compute,
in the same order and precisions: the normalisation in float32 (whatever the input dtype), rounded to the input
dtype, then multiplied by the weight in the promoted dtype. Classes that compute something else (Gemma's
``1 + weight``, OLMo-2's multiply before the downcast) are not in ``CLASSES`` and keep their forward.

Triton is imported on first use; on the CPU its interpreter (``TRITON_INTERPRET=1``) runs the kernel for tests.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import lru_cache

import torch

from . import triton_attention
from .hooks import replaced_forward

#: RMSNorm classes whose forward is ``weight * (x.float() * rsqrt(mean(x.float()**2) + variance_epsilon)).to(x.dtype)``
#: in the supported transformers range (tests/unit/core/test_triton_norm.py checks each against its own forward).
CLASSES = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm",
                     "GraniteRMSNorm"})


#: The engine's ``rms_norm`` choices: "model" (the modules' own forward) or "triton" (``fused``).
CHOICES = ("model", "triton")


def check_choice(name: str) -> None:
    if name not in CHOICES:
        raise ValueError(f"rms_norm must be one of {CHOICES}, not {name!r}")
    if name == "triton" and not triton_attention.available():
        raise RuntimeError("rms_norm 'triton' needs the triton package (CUDA builds of torch bring it)")


def check_device(device: torch.device) -> None:
    """The kernel runs on CUDA devices, and elsewhere only under Triton's interpreter (the CPU tests)."""
    if device.type == "cuda":
        return
    import triton

    if not triton.knobs.runtime.interpret:
        raise ValueError(f"rms_norm 'triton' runs on CUDA devices, not on {device} (Triton's interpreter, "
                         "TRITON_INTERPRET=1, runs it on the CPU for tests)")


@lru_cache(maxsize=1)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def rms_norm(x_ptr, weight_ptr, out_ptr, x_row, out_row, eps, WIDTH: tl.constexpr, BLOCK: tl.constexpr,
                 PRODUCT: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        inside = cols < WIDTH
        x = tl.load(x_ptr + row * x_row + cols, mask=inside, other=0.0)
        wide = x.to(tl.float32)
        mean_square = tl.sum(wide * wide, 0) / WIDTH
        normed = (wide * tl.math.rsqrt(mean_square + eps)).to(x.dtype)  # the model's downcast before the weight
        weight = tl.load(weight_ptr + cols, mask=inside, other=0.0)
        out = weight.to(PRODUCT) * normed.to(PRODUCT)
        tl.store(out_ptr + row * out_row + cols, out.to(out_ptr.dtype.element_ty), mask=inside)

    return rms_norm, triton, tl


def rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (h.float() * rsqrt(mean(h.float()**2, -1) + eps)).to(h.dtype)`` over the last dimension."""
    kernel, triton, tl = _kernel()
    width = hidden.shape[-1]
    if weight.shape != (width,):
        raise ValueError(f"RMSNorm weight of shape {tuple(weight.shape)} for a last dimension of {width}")
    rows = hidden.reshape(-1, width)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out_dtype = torch.promote_types(weight.dtype, hidden.dtype)
    out = torch.empty(rows.shape, dtype=out_dtype, device=hidden.device)
    # a product of two rounded numbers is exact in float32 for 16-bit inputs, so rounding it once to out_dtype is
    # what torch's own multiply gives; float64 multiplies in float64
    product = tl.float64 if out_dtype == torch.float64 else tl.float32
    block = triton.next_power_of_2(width)
    kernel[(rows.shape[0],)](rows, weight, out, rows.stride(0), out.stride(0), float(eps), WIDTH=width, BLOCK=block,
                             PRODUCT=product, num_warps=min(16, max(1, block // 256)))
    return out.view(hidden.shape)


def _fused_forward(module):
    def forward(hidden_states):
        return rms_norm(hidden_states, module.weight, module.variance_epsilon)

    return forward


def fusable(module: torch.nn.Module) -> bool:
    """A norm of the LLaMA formula whose instance has no forward of its own: a module with one (accelerate's
    device-alignment wrapper under ``device_map``) keeps it, since the kernel would skip what it does."""
    return (type(module).__name__ in CLASSES and hasattr(module, "variance_epsilon") and hasattr(module, "weight")
            and "forward" not in module.__dict__)


@contextmanager
def fused(model: torch.nn.Module):
    """Run every fusable RMSNorm module of ``model`` through the kernel inside the block."""
    modules = [m for m in model.modules() if fusable(m)]
    with replaced_forward(modules, _fused_forward):
        yield len(modules)
