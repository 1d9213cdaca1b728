"""Where a worker's results go: the database, one transaction per chunk, retried through outages. The batcher
hands these writes to a writer thread (`workers.writer.WriteBehind`) so that they overlap compute."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from selfie_jobs import chunks as chunk_ops
from selfie_jobs.chunks import WriteOutcome
from selfie_jobs.retry import unit_of_work


@dataclass
class DbSink:
    sessions: Callable[[], Session]
    owner: str
    model: str
    engine_run_id: str
    retry_seconds: float

    def write(self, chunk_id: int, rows: Sequence[Any], complete: bool) -> WriteOutcome:
        return chunk_ops.complete_chunk(
            self.sessions, chunk_id, self.owner, rows, engine_run_id=self.engine_run_id, worker=self.owner,
            model=self.model, complete=complete, retry_seconds=self.retry_seconds,
        )

    def write_many(self, writes: Sequence[tuple[int, Sequence[Any], bool]]) -> list[WriteOutcome]:
        """Writes of chunks of one job in one transaction (`chunks.write_many`)."""
        return chunk_ops.complete_many(
            self.sessions, writes, self.owner, engine_run_id=self.engine_run_id, worker=self.owner, model=self.model,
            retry_seconds=self.retry_seconds,
        )

    def fail_job(self, job_id: str, error: str) -> None:
        unit_of_work(self.sessions, lambda session: chunk_ops.fail_job(session, job_id, error), self.retry_seconds)
