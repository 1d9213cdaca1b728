"""The engine's masked attention calls, 7B-shaped (32 heads of 128, bf16), timed on each SDPA backend.

The engine gives attention a 4D bool mask in three places:
- a static decode step (``selfie_core.decoding.StaticDecoder``): one query over the whole preallocated cache, the
  positions not written yet hidden (also timed through the engine's Triton kernel, ``selfie_core.triton_attention``);
  a growing step instead attends over the written positions with no mask;
- the per-row prefill: the positions from the first placeholder on, causal, after the shared prefix;
- the no-inject pass (``selfie_core.relevancy``): lanes of packed prefix trees, each node seeing the prompt and
  its own ancestors.

    python benchmarks/attention_bench.py [--rows 640]
    TRITON_INTERPRET=1 python benchmarks/attention_bench.py --device cpu --rows 4 --heads 2   # checks the script
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention as sdpa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selfie_core.triton_attention import single_query_attention  # noqa: E402

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def time_us(fn, device: torch.device, repeat: int = 30) -> float:
    for _ in range(3):
        fn()
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        return (time.perf_counter() - start) * 1e6 / repeat
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / repeat


def triton_timings(q, k, v, visible, want, device: torch.device, shapes: bool) -> list[str]:
    """The engine's Triton kernel at its own launch shape, and with ``shapes`` at others (positions per block x
    warps per program), to choose from."""
    scale = q.shape[-1] ** -0.5
    launches = [(None, 4)] + ([(b, w) for b in (16, 32, 64) for w in (1, 2, 4, 8)] if shapes else [])
    line = []
    for block, warps in launches:
        def call():
            return single_query_attention(q, k, v, visible, scale, block_positions=block, num_warps=warps)

        err = (call().transpose(1, 2).float() - want).abs().max().item()
        name = "triton" if block is None else f"triton {block}x{warps}w"
        line.append(f"{name} {time_us(call, device):.0f} ({err:.0e})")
    return line


def qkv(batch: int, heads: int, q_len: int, k_len: int, dim: int, device: torch.device):
    q = torch.randn(batch, heads, q_len, dim, device=device, dtype=torch.bfloat16)
    k = torch.randn(batch, heads, k_len, dim, device=device, dtype=torch.bfloat16)
    return q, k, torch.randn_like(k)


def cases(rows: int, heads: int, dim: int, prompt: int, first: int, new: int, lane: int, device: torch.device):
    """(name, q, k, v, mask or None)"""
    filled = prompt + new // 2
    q, k, v = qkv(rows, heads, 1, prompt + new, dim, device)
    written = (torch.arange(prompt + new, device=device) < filled).view(1, 1, 1, -1).expand(rows, 1, 1, -1)
    yield "decode, static (whole cache, mask)", q, k, v, written
    yield "decode, growing (written part, no mask)", q, k[:, :, :filled], v[:, :, :filled], None
    q_len = prompt - first
    q, k, v = qkv(rows, heads, q_len, prompt, dim, device)
    causal = torch.ones(q_len, prompt, dtype=torch.bool, device=device).tril(first)
    yield f"prefill ({q_len} positions after {first})", q, k, v, causal.view(1, 1, q_len, prompt).expand(rows, 1, -1, -1)
    lanes = max(1, rows * (new - 1) // lane)
    q, k, v = qkv(lanes, heads, lane, prompt + lane, dim, device)
    chain = torch.ones(new - 1, new - 1, dtype=torch.bool, device=device).tril()
    tree = torch.block_diag(*[chain] * (lane // (new - 1) + 1))[:lane, :lane]
    mask = torch.cat([torch.ones(lane, prompt, dtype=torch.bool, device=device), tree], 1)
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
    ap.add_argument("--triton-shapes", action="store_true",
                    help="also time the Triton kernel at other launch shapes (positions per block x warps)")
    ap.add_argument("--device", default="cuda", help="cpu: only checks the script (Triton through its interpreter, TRITON_INTERPRET=1)")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(f"bf16, {args.heads} heads of {args.head_dim}; microseconds per layer call (max difference from math)")
    for name, q, k, v, mask in cases(args.rows, args.heads, args.head_dim, args.prompt, args.first, args.new, args.lane,
                                      device):
        with sdpa_kernel([SDPBackend.MATH]):
            want = sdpa(q.float(), k.float(), v.float(), attn_mask=mask)
        line = []
        for backend_name, backend in BACKENDS.items():
            try:
                with sdpa_kernel([backend]):
                    got = sdpa(q, k, v, attn_mask=mask)
                    us = time_us(lambda: sdpa(q, k, v, attn_mask=mask), device)
            except RuntimeError:
                line.append(f"{backend_name} -")
                continue
            err = (got.float() - want).abs().max().item()
            line.append(f"{backend_name} {us:.0f} ({err:.0e})")
        if mask is not None and q.shape[2] == 1:  # the engine's opt-in kernel for static decode steps
            line += triton_timings(q, k, v, mask[:, 0, 0, :], want, device, args.triton_shapes)
        print(f"  {name:42s} " + ", ".join(line), flush=True)


if __name__ == "__main__":
    main()
