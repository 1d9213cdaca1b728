"""Single-query attention for the static decode steps, as a Triton kernel (opt-in; CUDA).

A static decode step (``decoding.StaticDecoder``) attends one query per row over the whole preallocated cache
buffer, with a mask that shows the positions written so far. SDPA's kernels are built for long queries: on an
H200 with the 7B-shaped step (640 rows, 32 heads, 40 positions) they took 330-634 us per layer, where reading the
cache once takes about 75 us (benchmarks/attention_bench.py). Here one program per (row, head) reads that row's
visible keys and values only (the masked loads skip the positions not written yet) and keeps an online softmax in
float32 (float64 for float64 inputs).

It plugs in through transformers' ``AttentionInterface`` under ``NAME``; the static decoder selects it around its
own steps only (``selected``), so the prefill and the no-inject pass keep the model's implementation. Whatever
this kernel does not cover (more than one query, a float mask, a mask per head, dropout, soft-capping, a
position bias, sliding windows) goes to transformers' SDPA function unchanged.

Triton is imported on first use. On the CPU, Triton's interpreter (``TRITON_INTERPRET=1`` set before the first
use) runs the same kernel, which is how the CPU tests check it.
"""

from __future__ import annotations

import importlib.util
import math
from contextlib import contextmanager
from functools import lru_cache

import torch

#: The name this attention is registered under in transformers' ``AttentionInterface``.
NAME = "selfie_single_query"

#: Keyword arguments some models pass to their attention that this kernel does not implement.
_UNSUPPORTED = ("softcap", "position_bias", "sliding_window", "s_aux", "sinks")


def available() -> bool:
    """Triton is installed (a CUDA build of torch brings it; ``pip install triton`` elsewhere)."""
    return importlib.util.find_spec("triton") is not None


@lru_cache(maxsize=1)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def single_query_attention(
        q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, scale,
        q_row, q_head, k_row, k_head, k_pos, v_row, v_head, v_pos, mask_row, mask_pos, out_row, out_head,
        LENGTH: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_L: tl.constexpr, ACC: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)  # row offsets of a large batch pass 2**31 elements
        head = tl.program_id(1)
        kv_head = head // GROUP  # grouped-query attention: GROUP query heads share one key/value head
        dims = tl.arange(0, BLOCK_D)
        in_dim = dims < HEAD_DIM
        q = tl.load(q_ptr + row * q_row + head * q_head + dims, mask=in_dim, other=0.0).to(ACC)
        k_base = k_ptr + row * k_row + kv_head * k_head
        v_base = v_ptr + row * v_row + kv_head * v_head
        # Running max, normaliser and weighted sum of the online softmax. The max starts finite, so a block with
        # no visible position gives weights exp(-inf) = 0 instead of exp(-inf - -inf) = NaN.
        top = tl.full((), -1e30, ACC)
        total = tl.zeros((), ACC)
        acc = tl.zeros((BLOCK_D,), ACC)
        for start in range(0, LENGTH, BLOCK_L):
            pos = start + tl.arange(0, BLOCK_L)
            visible = tl.load(mask_ptr + row * mask_row + pos * mask_pos, mask=pos < LENGTH, other=0) != 0
            tile = visible[:, None] & in_dim[None, :]
            k = tl.load(k_base + pos[:, None] * k_pos + dims[None, :], mask=tile, other=0.0).to(ACC)
            scores = tl.where(visible, tl.sum(k * q[None, :], 1) * scale, float("-inf"))
            new_top = tl.maximum(top, tl.max(scores, 0))
            weights = tl.exp(scores - new_top)
            rescale = tl.exp(top - new_top)
            v = tl.load(v_base + pos[:, None] * v_pos + dims[None, :], mask=tile, other=0.0).to(ACC)
            acc = acc * rescale + tl.sum(weights[:, None] * v, 0)
            total = total * rescale + tl.sum(weights, 0)
            top = new_top
        out = acc / total
        tl.store(out_ptr + row * out_row + head * out_head + dims, out.to(out_ptr.dtype.element_ty), mask=in_dim)

    return single_query_attention, triton, tl


def single_query_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, visible: torch.Tensor,
                           scale: float, block_positions: int | None = None, num_warps: int = 4) -> torch.Tensor:
    """softmax(q.k * scale over the visible positions) . v for one query per row.

    ``query`` (batch, heads, 1, dim); ``key``/``value`` (batch, kv_heads, length, dim) with ``heads`` a multiple
    of ``kv_heads``; ``visible`` (batch, length) bool, any strides (a mask shared by all rows may be an
    ``expand``). Returns (batch, 1, heads, dim), the layout transformers' attention functions return. A row must
    see at least one position. ``block_positions`` (a power of two) and ``num_warps``: the launch's shape, for
    benchmarks/attention_bench.py to compare.
    """
    kernel, triton, tl = _kernel()
    batch, heads, queries, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    if queries != 1 or heads % kv_heads or value.shape[:3] != key.shape[:3] or value.shape[-1] != dim:
        raise ValueError(f"single-query attention got query {tuple(query.shape)}, key {tuple(key.shape)}, "
                         f"value {tuple(value.shape)}")
    if visible.shape != (batch, length) or visible.dtype != torch.bool:
        raise ValueError(f"visible must be a ({batch}, {length}) bool tensor, not {tuple(visible.shape)} {visible.dtype}")
    if key.stride(-1) != 1 or value.stride(-1) != 1 or query.stride(-1) != 1:
        raise ValueError("single-query attention needs the head dimension contiguous")
    out = torch.empty((batch, 1, heads, dim), dtype=query.dtype, device=query.device)
    acc = tl.float64 if query.dtype == torch.float64 else tl.float32
    block_d = triton.next_power_of_2(dim)
    # keys and values of one block in registers: 4096 elements keep a 128-dim head at 32 positions per block
    block_l = block_positions or max(1, min(triton.next_power_of_2(length), 4096 // block_d))
    mask = visible.view(torch.uint8)  # the same bytes, read as bytes (a bool tensor is an i1 pointer to Triton)
    kernel[(batch, heads)](
        query, key, value, mask, out, float(scale),
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), mask.stride(0), mask.stride(1),
        out.stride(0), out.stride(2),
        LENGTH=length, GROUP=heads // kv_heads, HEAD_DIM=dim, BLOCK_D=block_d, BLOCK_L=block_l, ACC=acc,
        num_warps=num_warps,
    )
    return out


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """A transformers attention function: this kernel for one query with a bool (batch, 1, 1, length) mask,
    transformers' SDPA function for everything else."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    covered = (
        query.shape[2] == 1
        and isinstance(attention_mask, torch.Tensor)
        and attention_mask.dtype == torch.bool
        and attention_mask.dim() == 4
        and attention_mask.shape[1] == 1
        and attention_mask.shape[2] == 1
        and attention_mask.shape[-1] == key.shape[2]
        and not dropout
        and not kwargs.get("output_attentions")
        and all(kwargs.get(name) is None for name in _UNSUPPORTED)
    )
    if not covered:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    visible = attention_mask[:, 0, 0, :].expand(query.shape[0], -1)
    return single_query_attention(query, key, value, visible, scale), None


def register() -> None:
    """Register ``attention_forward`` as ``NAME`` with transformers (once; later calls do nothing)."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if NAME not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(NAME, attention_forward)


@contextmanager
def selected(model):
    """Run ``model``'s attention through ``NAME`` inside the block, and give the model its own back after it.

    Only models on transformers' SDPA implementation switch (their masks are bool, which the kernel reads); the
    setting lives on the model's config, which every attention layer reads at each forward.
    """
    config = model.config
    own = config._attn_implementation
    if own != "sdpa":
        yield
        return
    register()
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = own
