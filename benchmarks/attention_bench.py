"""The engine's masked attention calls, 7B-shaped (32 heads of 128, bf16), timed on each SDPA backend.

The engine gives attention a 4D bool mask in three places:
- a static decode step (``selfie_core.decoding.StaticDecoder``): one query over the whole preallocated cache, the
  positions not written yet hidden; a growing step instead attends over the written positions with no mask;
- the per-row prefill: the positions from the first placeholder on, causal, after the shared prefix;
- the no-inject pass (``selfie_core.relevancy``): lanes of packed prefix trees, each node seeing the prompt and
  its own ancestors.

    python benchmarks/attention_bench.py [--rows 640]
"""

from __future__ import annotations

import argparse

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention as sdpa

DEVICE = "cuda"
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def time_us(fn, repeat: int = 30) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / repeat


def qkv(batch: int, heads: int, q_len: int, k_len: int, dim: int):
    q = torch.randn(batch, heads, q_len, dim, device=DEVICE, dtype=torch.bfloat16)
    k = torch.randn(batch, heads, k_len, dim, device=DEVICE, dtype=torch.bfloat16)
    return q, k, torch.randn_like(k)


def cases(rows: int, heads: int, dim: int, prompt: int, first: int, new: int, lane: int):
    """(name, q, k, v, mask or None)"""
    filled = prompt + new // 2
    q, k, v = qkv(rows, heads, 1, prompt + new, dim)
    written = (torch.arange(prompt + new, device=DEVICE) < filled).view(1, 1, 1, -1).expand(rows, 1, 1, -1)
    yield "decode, static (whole cache, mask)", q, k, v, written
    yield "decode, growing (written part, no mask)", q, k[:, :, :filled], v[:, :, :filled], None
    q_len = prompt - first
    q, k, v = qkv(rows, heads, q_len, prompt, dim)
    causal = torch.ones(q_len, prompt, dtype=torch.bool, device=DEVICE).tril(first)
    yield f"prefill ({q_len} positions after {first})", q, k, v, causal.view(1, 1, q_len, prompt).expand(rows, 1, -1, -1)
    lanes = max(1, rows * (new - 1) // lane)
    q, k, v = qkv(lanes, heads, lane, prompt + lane, dim)
    chain = torch.ones(new - 1, new - 1, dtype=torch.bool, device=DEVICE).tril()
    tree = torch.block_diag(*[chain] * (lane // (new - 1) + 1))[:lane, :lane]
    mask = torch.cat([torch.ones(lane, prompt, dtype=torch.bool, device=DEVICE), tree], 1)
    yield f"no-inject pass ({lanes} lanes of {lane})", q, k, v, mask.view(1, 1, lane, -1).expand(lanes, 1, -1, -1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=640)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=20, help="interpretation prompt tokens")
    ap.add_argument("--first", type=int, default=3, help="tokens before the first placeholder")
    ap.add_argument("--new", type=int, default=20, help="new tokens")
    ap.add_argument("--lane", type=int, default=256, help="no-inject lane width")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"bf16, {args.heads} heads of {args.head_dim}; microseconds per layer call (max difference from math)")
    for name, q, k, v, mask in cases(args.rows, args.heads, args.head_dim, args.prompt, args.first, args.new, args.lane):
        with sdpa_kernel([SDPBackend.MATH]):
            want = sdpa(q.float(), k.float(), v.float(), attn_mask=mask)
        line = []
        for backend_name, backend in BACKENDS.items():
            try:
                with sdpa_kernel([backend]):
                    got = sdpa(q, k, v, attn_mask=mask)
                    us = time_us(lambda: sdpa(q, k, v, attn_mask=mask))
            except RuntimeError:
                line.append(f"{backend_name} -")
                continue
            err = (got.float() - want).abs().max().item()
            line.append(f"{backend_name} {us:.0f} ({err:.0e})")
        print(f"  {name:42s} " + ", ".join(line), flush=True)


if __name__ == "__main__":
    main()
