"""What a worker's running engine batch is doing, and whether its jobs are still wanted.

One `BatchWatch` per worker process, shared by the task thread (the engine calls it between decode steps) and the
heartbeat thread (which publishes it on the `workers` row and tells it which jobs were closed):

- `should_stop(keys)`: the engine's cancel check (`SelfieEngine.stream(should_stop=)`). A key is `(chunk id, ...)`;
  its rows stop when its chunk's job is closed (cancelled, or failed elsewhere). It reads a set in memory, never the
  database: the heartbeat thread polls the database (`selfie_jobs.queries.closed_jobs`) and fills it in.
- `on_step(step, steps, rows)`: where the batch is; `batch_done(rows)` after each engine batch, from which the
  measured rate (rows per second, engine and writes together: what the job's remaining rows will take) is kept.
- `snapshot()`: the `in_flight` entry of the heartbeat's info (the API's job status reads it,
  `selfie_jobs.queries.job_progress`).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

#: Weight of the newest engine batch in the measured rate (the rest: the batches before it).
RATE_WEIGHT = 0.5


class BatchWatch:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._job_of: dict[int, str] = {}  # held chunk -> its job
        self._closed: set[str] = set()  # jobs of held chunks that are closed: their rows stop
        self._jobs_decoding: Counter[str] = Counter()  # rows of each job in the running batch (until it yields)
        self._step = 0
        self._steps = 0
        self._batch_started = time.monotonic()
        self._batch_started_at: datetime | None = None
        self._rate: float | None = None

    # -- what is held ---------------------------------------------------------------------------------------
    def hold(self, job_of: Mapping[int, str]) -> None:
        with self._lock:
            self._job_of.update(job_of)

    def unhold(self, chunk_ids: Sequence[int]) -> None:
        with self._lock:
            for chunk_id in chunk_ids:
                self._job_of.pop(chunk_id, None)
            held_jobs = set(self._job_of.values())
            self._closed &= held_jobs
            if not self._job_of:
                self._jobs_decoding.clear()
                self._step = self._steps = 0
                self._batch_started_at = None

    def held_jobs(self) -> set[str]:
        with self._lock:
            return set(self._job_of.values())

    def closed(self, job_ids: Collection[str]) -> set[str]:
        """The heartbeat found these held jobs closed: their rows stop at the next decode step or batch. Returns
        those it had not been told of yet (the heartbeat finds them again every beat until the batch lets go)."""
        with self._lock:
            new = set(job_ids) - self._closed
            self._closed.update(job_ids)
            return new

    def is_closed(self, job_id: str) -> bool:
        """Whether the heartbeat found this held job closed (an edit looks between its epochs)."""
        with self._lock:
            return job_id in self._closed

    # -- the engine's callbacks -----------------------------------------------------------------------------
    def should_stop(self, keys: Sequence[Any]) -> set[Any]:
        with self._lock:
            job_of = self._job_of
            if self._step == 0:  # asked before the batch runs, with all its rows: what it holds of each job
                self._jobs_decoding = Counter(job_of.get(k[0]) for k in keys)
            if not self._closed:
                return set()
            stop = {k for k in keys if job_of.get(k[0]) in self._closed}
            for job in {job_of.get(k[0]) for k in stop}:
                self._jobs_decoding.pop(job, None)  # its rows leave the batch
            return stop

    def on_step(self, step: int, steps: int, rows: int) -> None:
        with self._lock:
            self._step, self._steps = step, steps

    def batch_started(self) -> None:
        with self._lock:
            self._batch_started = time.monotonic()
            self._batch_started_at = datetime.now(timezone.utc)
            self._step = 0

    def batch_done(self, rows: int) -> None:
        """An engine batch yielded `rows` results: the rate is measured from the time since the last batch ended
        (the writes of the batch before are part of what each row costs)."""
        with self._lock:
            elapsed = time.monotonic() - self._batch_started
            if rows and elapsed > 0:
                rate = rows / elapsed
                self._rate = rate if self._rate is None else RATE_WEIGHT * rate + (1 - RATE_WEIGHT) * self._rate
            self._jobs_decoding.clear()
            self._step = 0
        self.batch_started()

    # -- what the heartbeat publishes -----------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any] | None:
        with self._lock:
            if not self._job_of:
                return None
            return {
                "chunks": sorted(self._job_of),
                "jobs": {job: n for job, n in self._jobs_decoding.items() if job is not None},
                "step": self._step,
                "steps": self._steps,
                "batch_started_at": self._batch_started_at.isoformat() if self._batch_started_at else None,
                "rows_per_second": round(self._rate, 4) if self._rate is not None else None,
            }
