"""Deliberate faults for the fault-tolerance tests, switched on only by an explicit worker option.

`--inject-fault` (or SELFIE_WORKER_INJECT_FAULT) takes one of:
- ``oom-above:N``: every engine call with more than N items raises CUDA out-of-memory (the batcher must split);
- ``device-once:PATH``: the first engine call raises a CUDA device-side error, once across process restarts
  (PATH records that it fired), so the worker must exit and its replacement must finish the work.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any


class FaultInjectingRunner:
    def __init__(self, inner: Any, spec: str):
        kind, _, arg = spec.partition(":")
        if kind not in ("oom-above", "device-once") or not arg:
            raise ValueError(f"unknown fault {spec!r}: use oom-above:N or device-once:PATH")
        self.inner = inner
        self.kind = kind
        self.arg = arg

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def stream(self, items: Sequence[Any], spec: dict[str, Any]) -> Iterator[list[Any]]:
        if self.kind == "oom-above" and len(items) > int(self.arg):
            import torch

            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (injected for {len(items)} items)")
        if self.kind == "device-once":
            marker = Path(self.arg)
            if not marker.exists():
                marker.write_text("fired")
                raise RuntimeError("CUDA error: device-side assert triggered (injected)")
        return self.inner.stream(items, spec)
