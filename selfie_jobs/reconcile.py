"""Finding what the queue lost: the database is the source of truth, Redis only carries wake-up calls."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from selfie_jobs.chunks import GONE_WORKER_STATES, as_utc, fail_job
from selfie_jobs.models import Chunk, Job, Worker, utcnow
from selfie_jobs.states import ChunkState, JobState


@dataclass(frozen=True)
class Redelivery:
    chunk_id: int
    model: str
    priority: int


@dataclass
class ReconcileReport:
    redeliver: list[Redelivery] = field(default_factory=list)
    timed_out_jobs: list[str] = field(default_factory=list)
    failed_jobs: list[str] = field(default_factory=list)


def reconcile(
    session: Session, settings: Any, now: datetime | None = None, *, max_attempts: int | None = None
) -> ReconcileReport:
    """Find what the queue lost. The caller commits, then sends one `run_chunk` per returned redelivery.

    - jobs past their deadline (deadline_at, else created_at + job_timeout_seconds) fail with a stored error;
    - `queued` chunks whose last enqueue is older than the grace period are sent again (Redis lost or flushed);
    - `running` chunks whose lease ran out, or whose owner stopped heartbeating, are sent again (a crashed
      worker); past `max_attempts` their job fails instead of crashing workers forever.
    A duplicate message is harmless: the chunk's compare-and-set claim lets only one worker run it.
    """
    now = now or utcnow()
    max_attempts = max_attempts or getattr(settings, "max_chunk_attempts", 5)
    report = ReconcileReport()

    open_job = Job.state.in_([JobState.QUEUED, JobState.RUNNING])
    timeout = timedelta(seconds=settings.job_timeout_seconds)
    overdue = or_(Job.deadline_at < now, and_(Job.deadline_at.is_(None), Job.created_at < now - timeout))
    for job_id, deadline_at, created_at in session.execute(
        select(Job.id, Job.deadline_at, Job.created_at).where(open_job, overdue)
    ).all():
        deadline = as_utc(deadline_at) or as_utc(created_at) + timeout
        if fail_job(session, job_id, f"job timed out: not finished by its deadline {deadline.isoformat()}", now=now):
            report.timed_out_jobs.append(job_id)

    grace = now - timedelta(seconds=settings.enqueue_grace_seconds)
    alive_since = now - timedelta(seconds=settings.worker_alive_seconds)
    live_owners = set(
        session.scalars(
            select(Worker.name).where(Worker.last_heartbeat >= alive_since, Worker.state.not_in(GONE_WORKER_STATES))
        ).all()
    )
    # Only candidates come back from the database (a big backlog of freshly queued chunks is not read).
    stale_queued = and_(
        Chunk.state == ChunkState.QUEUED,
        or_(Chunk.enqueued_at < grace, and_(Chunk.enqueued_at.is_(None), Job.created_at < grace)),
    )
    ownerless = [Chunk.lease_expires_at.is_(None), Chunk.lease_expires_at < now, Chunk.owner.is_(None)]
    if live_owners:
        ownerless.append(Chunk.owner.not_in(sorted(live_owners)))
    else:
        ownerless.append(Chunk.owner.is_not(None))
    lost_running = and_(Chunk.state == ChunkState.RUNNING, or_(*ownerless))
    rows = session.execute(
        select(Chunk, Job.created_at)
        .join(Job, Job.id == Chunk.job_id)
        .where(open_job, or_(stale_queued, lost_running))
        .order_by(Chunk.priority.desc(), Chunk.id)
    ).all()
    for chunk, job_created in rows:
        if chunk.state == ChunkState.QUEUED:
            last_sent = as_utc(chunk.enqueued_at) or as_utc(job_created)
            if last_sent > grace:
                continue
        else:
            lease_over = chunk.lease_expires_at is None or as_utc(chunk.lease_expires_at) < now
            if not lease_over and chunk.owner in live_owners:
                continue
            if chunk.attempts >= max_attempts:
                if fail_job(
                    session, chunk.job_id, f"chunk {chunk.index} was lost {chunk.attempts} times (worker crashes)", now=now
                ):
                    report.failed_jobs.append(chunk.job_id)
                continue
        chunk.enqueued_at = now
        report.redeliver.append(Redelivery(chunk.id, chunk.model, chunk.priority))
    session.flush()
    return report
