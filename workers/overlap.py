"""Database work that overlaps the engine's: a run's last writes, and the claim of the next run.

Between two engine runs the worker used to wait for the run's last writes to commit, record the run, answer the
message, take the next one and claim its chunks: the accelerator idled for all of it, every run (benchmarks/README.md,
"Database cycle"). Two threads take that work off the engine's path:

- completions: a task hands the rest of its run (the last writes, then the run recorded and its chunks let go) to
  the completion thread and returns (`defer`). What stays true: a chunk is done only when the transaction that
  marks it has committed; the run's chunks stay held (the heartbeat renews their leases) until then; a write that
  fails hands the run's chunks back to the queue, as the task would have. A worker killed while a run completes
  has acknowledged that run's message already: its chunks stay `running` under an owner that stops beating, and
  the reconciler sends them again (their committed rows are skipped by the unique key). Runs complete one at a
  time, in order; deferring a run while `limit` others wait first waits for the oldest, so the rows held in memory
  stay bounded. A worker process that stops drains them first (`drain`).
- claims: the next run of the same batch key is claimed while the engine computes the current one (`claim_ahead`,
  see `workers.claims.ClaimAhead`).

Both are single threads kept for the process's life (a thread started per run cost milliseconds on a loaded box).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from threading import Lock
from typing import Any

log = logging.getLogger(__name__)

#: Runs waiting to complete at most, besides the one completing: one is what hides a run's last writes behind the
#: next run's compute; more would only hold more rows in memory.
COMPLETING_RUNS = 1


class Overlap:
    """The completion and claim threads of a worker process (see the module docstring)."""

    def __init__(self, limit: int = COMPLETING_RUNS):
        self.limit = max(1, limit)
        self._lock = Lock()
        self._completing: deque[Future[None]] = deque()
        self._completions: ThreadPoolExecutor | None = None
        self._claims: ThreadPoolExecutor | None = None

    def defer(self, complete: Callable[[], None]) -> None:
        """Complete a run in the completion thread, after the oldest waiting ones past the limit. `complete` handles
        its own errors: nothing here can raise them to the task that deferred it, so one that escapes is logged."""
        with self._lock:
            while len(self._completing) > self.limit:
                self._wait(self._completing.popleft())
            while self._completing and self._completing[0].done():
                self._wait(self._completing.popleft())
            if self._completions is None:
                self._completions = ThreadPoolExecutor(1, thread_name_prefix="selfie-completion")
            self._completing.append(self._completions.submit(complete))

    def claim_ahead(self, claim: Callable[[], Any]) -> Future[Any]:
        """Run `claim` in the claim thread; its result (or error) comes through the future."""
        with self._lock:
            if self._claims is None:
                self._claims = ThreadPoolExecutor(1, thread_name_prefix="selfie-claim-ahead")
            return self._claims.submit(claim)

    def drain(self, timeout: float | None = None) -> bool:
        """Wait for every run completing here; returns whether they all finished within `timeout` seconds."""
        with self._lock:
            pending = list(self._completing)
            self._completing.clear()
        done, left = wait(pending, timeout)
        for future in done:
            self._wait(future)
        if left:
            log.warning("%d engine runs still completing after %ss", len(left), timeout)
        return not left

    @staticmethod
    def _wait(future: Future[None]) -> None:
        try:
            future.result()
        except Exception:  # noqa: BLE001 - `complete` handles its errors; one that escaped it is a bug: logged
            log.exception("completing an engine run failed")
