"""Shared helpers for audit tests: a migrated SQLite database with the tiny model card, a recording task sender,
and a stand-in worker that writes results through the real chunk write path."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from selfie_jobs.chunks import ResultRow, claim_chunk, write_results
from selfie_jobs.db import get_sessionmaker
from selfie_jobs.models import Chunk, Prompt
from tests.apisupport import MODEL, prepare_database, settings_for


class RecordingSender:
    def __init__(self) -> None:
        self.sent: list[tuple[str, list[Any], dict[str, Any]]] = []

    def send_task(self, name: str, args: list[Any] | None = None, **options: Any) -> None:
        self.sent.append((name, list(args or []), options))


def setup_db(url: str, **overrides: Any):
    prepare_database(url)
    values = {"max_prompts_per_job": 4, "max_interpretations_per_job": 200, "chunk_size": 8}
    values.update(overrides)
    settings = settings_for(url, "redis://127.0.0.1:1/0", **values)
    return settings, get_sessionmaker(url)


def jsonl(prompts: list[str]) -> io.BytesIO:
    return io.BytesIO("".join(json.dumps({"prompt": p, "n": i}) + "\n" for i, p in enumerate(prompts)).encode())


def run_all_chunks(maker, text_for: Callable[[str, int, int, int], tuple[str, float]], job_ids=None) -> int:
    """Claim every queued chunk (of `job_ids`) and write results as a worker would: text from `text_for`."""
    written = 0
    with maker() as session:
        q = select(Chunk.id).where(Chunk.state == "queued")
        if job_ids is not None:
            q = q.where(Chunk.job_id.in_(list(job_ids)))
        chunk_ids = list(session.scalars(q.order_by(Chunk.id)))
    for chunk_id in chunk_ids:
        with maker() as session, session.begin():
            claimed = claim_chunk(session, chunk_id, "test-worker", 60)
            assert claimed is not None
            tokens = {
                p.index: p.tokens
                for p in session.scalars(select(Prompt).where(Prompt.job_id == claimed.job_id))
            }
            rows = []
            for p, layer, token in claimed.items:
                text, rel = text_for(claimed.job_id, p, layer, token)
                rows.append(ResultRow(p, layer, token, tokens[p][token], text, [1, 2], [rel, rel], rel))
            write_results(session, chunk_id, "test-worker", rows, engine_run_id="r" * 32, worker="test-worker",
                          model=MODEL, complete=True)
            written += len(rows)
    return written


def scan_all(maker, detect) -> None:
    from selfie_jobs.audits import jobs_to_scan, refresh_run, scan_job
    from selfie_jobs.audit_models import AuditRun

    with maker() as session:
        for rj in jobs_to_scan(session, limit=10_000):
            scan_job(session, rj, detect)
            session.commit()
        for run_id in session.scalars(select(AuditRun.id)):
            refresh_run(session, run_id)
        session.commit()


def session_of(maker) -> Session:
    return maker()
