"""Finding what the queue lost: the database is the source of truth, Redis only carries wake-up calls."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from selfie_jobs.chunks import as_utc, fail_job
from selfie_jobs.liveness import live_worker_names
from selfie_jobs.models import Chunk, Job, utcnow
from selfie_jobs.queue import model_queue
from selfie_jobs.states import FINAL_JOB_STATES, ChunkState, JobState


@dataclass(frozen=True)
class Redelivery:
    chunk_id: int
    model: str
    priority: int
    kind: str | None = None  # the chunk's job kind: edit kinds have a task name of their own


@dataclass
class ReconcileReport:
    redeliver: list[Redelivery] = field(default_factory=list)
    timed_out_jobs: list[str] = field(default_factory=list)
    failed_jobs: list[str] = field(default_factory=list)
    closed_chunks: int = 0  # running chunks of closed jobs whose owner is gone


def reconcile(
    session: Session,
    settings: Any,
    now: datetime | None = None,
    *,
    max_attempts: int | None = None,
    waiting: Callable[[str], int] | None = None,
) -> ReconcileReport:
    """Find what the queue lost. The caller commits, then sends one `run_chunk` per returned redelivery.

    - jobs past their deadline (deadline_at, else created_at + job_timeout_seconds) fail with a stored error;
    - `queued` chunks never sent (enqueued_at empty: the publish failed) are sent once the grace period is over;
    - `queued` chunks sent longer ago than the grace period are sent again only as far as their queue is short of
      messages (`waiting(queue)`, see `selfie_jobs.queue.message_counter`): a backlog waits in Redis with one
      message per chunk, and re-sending it on every pass piled up duplicates growing with the square of its
      length. Redis flushed or restarted empty, or a message lost after the commit, leave the queue holding fewer
      messages than it has sent queued chunks; the chunks sent longest ago are re-sent, one per missing message.
      Without `waiting` (the broker is not asked) every such chunk is re-sent;
    - `running` chunks whose lease ran out, or whose owner stopped heartbeating, are sent again (a crashed
      worker); past `max_attempts` their job fails instead of crashing workers forever.
    - `running` chunks of a job that was closed (cancelled, failed) while their owner was gone are closed too: a
      live owner closes its own when it writes, but nobody writes for a dead one.
    A re-sent chunk waits for the grace period again. A duplicate message is harmless: the chunk's
    compare-and-set claim lets only one worker run it.
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
    sent_long_ago = Chunk.enqueued_at < grace
    missing: dict[str, int] | None = None  # per queue: messages it lacks; None: every sent chunk counts as lost
    if waiting is not None:
        # Counted before the broker is asked: the api stamps enqueued_at only after it has published, so a
        # submission in flight can add to the queue's messages here, never to the expected count. A worker between
        # taking a message and claiming its chunk makes one message look missing: one harmless duplicate at most.
        sent = session.execute(
            select(Chunk.model, func.count())
            .join(Job, Job.id == Chunk.job_id)
            .where(open_job, Chunk.state == ChunkState.QUEUED, Chunk.enqueued_at.is_not(None))
            .group_by(Chunk.model)
        ).all()
        expected = {model_queue(model): count for model, count in sent}  # one queue per model
        missing = {queue: count - waiting(queue) for queue, count in expected.items()}
        missing = {queue: count for queue, count in missing.items() if count > 0}
        sent_long_ago = and_(sent_long_ago, Chunk.model.in_([m for m, _ in sent if model_queue(m) in missing]))

    live_owners = live_worker_names(session, settings.worker_alive_seconds, now=now)
    # Only candidates come back from the database (a big backlog of freshly queued chunks is not read).
    never_sent = and_(Chunk.enqueued_at.is_(None), Job.created_at < grace)
    stale_queued = and_(Chunk.state == ChunkState.QUEUED, or_(sent_long_ago, never_sent))
    ownerless = [Chunk.lease_expires_at.is_(None), Chunk.lease_expires_at < now, Chunk.owner.is_(None)]
    if live_owners:
        ownerless.append(Chunk.owner.not_in(sorted(live_owners)))
    else:
        ownerless.append(Chunk.owner.is_not(None))
    lost_running = and_(Chunk.state == ChunkState.RUNNING, or_(*ownerless))
    rows = session.execute(
        select(Chunk, Job.created_at, Job.kind)
        .join(Job, Job.id == Chunk.job_id)
        .where(open_job, or_(stale_queued, lost_running))
        .order_by(Chunk.priority.desc(), Chunk.id)
    ).all()
    lost: list[Chunk] = []
    short_of_messages: dict[str, list[Chunk]] = {}
    kind_of: dict[int, str] = {}
    for chunk, job_created, kind in rows:
        kind_of[chunk.id] = kind
        if chunk.state == ChunkState.QUEUED:
            last_sent = as_utc(chunk.enqueued_at) or as_utc(job_created)
            if last_sent > grace:
                continue
            if missing is not None and chunk.enqueued_at is not None:
                short_of_messages.setdefault(model_queue(chunk.model), []).append(chunk)
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
        lost.append(chunk)
    for queue, chunks in short_of_messages.items():
        chunks.sort(key=lambda c: (as_utc(c.enqueued_at), -c.priority, c.id))
        lost.extend(chunks[: missing[queue]])
    for chunk in lost:
        chunk.enqueued_at = now
        report.redeliver.append(Redelivery(chunk.id, chunk.model, chunk.priority, kind_of.get(chunk.id)))
    for job_states, chunk_state in (([JobState.CANCELLED], ChunkState.CANCELLED),
                                    ([s for s in FINAL_JOB_STATES if s != JobState.CANCELLED], ChunkState.FAILED)):
        report.closed_chunks += session.execute(
            update(Chunk)
            .where(Chunk.state == ChunkState.RUNNING, or_(*ownerless),
                   Chunk.job_id.in_(select(Job.id).where(Job.state.in_(job_states))))
            .values(state=chunk_state, finished_at=now, lease_expires_at=None)
            .execution_options(synchronize_session=False)
        ).rowcount
    session.flush()
    return report
