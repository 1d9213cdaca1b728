"""A job's baseline: the interpretation prompt's own output with nothing injected (`selfie_core.grounding`),
computed by the worker once per job spec and stored with each job of it before the job's first results."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from selfie_jobs.models import Job


def store_baseline(session: Session, job_ids: Sequence[str], baseline: dict[str, Any]) -> int:
    """Write `baseline` ({"text", "token_ids"}) on those of the jobs that have none yet (a job's first is kept: a
    redelivered chunk or a second worker computes the same one). Returns how many were written; the caller
    commits."""
    if not job_ids:
        return 0
    result = session.execute(
        update(Job).where(Job.id.in_(list(job_ids)), Job.baseline.is_(None)).values(baseline=baseline)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount or 0
