"""Deliberate faults for the fault-tolerance tests, switched on only by an explicit worker option.

`--inject-fault` (or SELFIE_WORKER_INJECT_FAULT) takes one of:
- ``oom-above:N``: every engine call with more than N items raises CUDA out-of-memory (the batcher must split);
- ``device-once:PATH``: the first engine call raises a CUDA device-side error, once across process restarts
  (PATH records that it fired), so the worker must exit and its replacement must finish the work;
- ``hold-write:PATH``: the writer thread commits its first write, then holds the second one (rows handed over,
  not committed) for good after recording PATH, once across process restarts, so a test can kill the worker
  while its writer holds rows;
- ``hold-completion:PATH``: the same for the first write that completes a chunk (the last rows of the chunk, handed
  over when the engine is done with them), so a test can kill the worker after its task has returned and while the
  run completes in the background (`workers.overlap`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import threading
from pathlib import Path
from typing import Any

KINDS = ("oom-above", "device-once", "hold-write", "hold-completion")
HOLDS = ("hold-write", "hold-completion")


def parse(spec: str) -> tuple[str, str]:
    kind, _, arg = spec.partition(":")
    if kind not in KINDS or not arg:
        raise ValueError(f"unknown fault {spec!r}: use oom-above:N, device-once:PATH, hold-write:PATH or "
                         "hold-completion:PATH")
    return kind, arg


class FaultInjectingRunner:
    def __init__(self, inner: Any, spec: str):
        kind, arg = parse(spec)
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


class FaultInjectingSink:
    """A sink whose second write (``hold-write``) or first completing write (``hold-completion``) never finishes; any
    other fault leaves writes alone."""

    def __init__(self, inner: Any, spec: str):
        self.inner = inner
        self.kind, self.arg = parse(spec)
        self.writes = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def write(self, chunk_id: int, rows: Sequence[Any], complete: bool) -> Any:
        self.writes += 1
        marker = Path(self.arg)
        held = self.writes == 2 if self.kind == "hold-write" else self.kind == "hold-completion" and complete
        if held and not marker.exists():
            marker.write_text(f"holding {len(rows)} rows of chunk {chunk_id}")
            threading.Event().wait()  # until the process is killed
        return self.inner.write(chunk_id, rows, complete)

    def write_many(self, writes: Sequence[tuple[int, Sequence[Any], bool]]) -> list[Any]:
        # one by one, so that the holds commit the writes before the one they hold, as they say
        if self.kind in HOLDS:
            return [self.write(*w) for w in writes]
        return self.inner.write_many(writes)
