"""RMSNorm at the engine's sizes: the model's own module (eight kernels) against the engine's Triton kernel.

    python benchmarks/norm_bench.py [--hidden 4096]
    TRITON_INTERPRET=1 python benchmarks/norm_bench.py --device cpu --rows 8 --hidden 64   # checks the script

Rows: a decode step of 640 rows, the per-row prefill (640 x 17 positions), the no-inject pass (640 x 19 generated
positions).
Prints microseconds per call, the bytes one read and one write move at that time, and the largest difference.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attention_bench import time_us  # noqa: E402  (this folder is on the path of a script run from it)
from selfie_core.triton_norm import rms_norm  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=640)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--device", default="cuda", help="cpu: only checks the script (with TRITON_INTERPRET=1)")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    norm = LlamaRMSNorm(args.hidden, eps=1e-5).to(device, torch.bfloat16)
    with torch.no_grad():
        norm.weight.normal_()
    print(f"bf16 RMSNorm over {args.hidden}; microseconds per call (GB/s of one read and one write; max difference)")
    for name, rows in (("decode step", args.rows), ("per-row prefill", args.rows * 17), ("no-inject pass", args.rows * 19)):
        x = torch.randn(rows, args.hidden, device=device, dtype=torch.bfloat16)
        with torch.no_grad():
            want = norm(x)
            own = time_us(lambda: norm(x), device)
            fused = time_us(lambda: rms_norm(x, norm.weight, norm.variance_epsilon), device)
            err = (rms_norm(x, norm.weight, norm.variance_epsilon).float() - want.float()).abs().max().item()
        moved = 2 * x.numel() * x.element_size() / 1e3  # bytes / 1e3 / us = GB/s
        print(f"  {name:16s} {rows:6d} rows: module {own:8.1f} ({moved / own:5.0f}), "
              f"triton {fused:8.1f} ({moved / fused:5.0f}; {err:.0e})", flush=True)


if __name__ == "__main__":
    main()
