"""The chunk lifecycle: claim (compare-and-set), lease renewal, completion, failure and reconciliation.

The database decides who works on what. A queue message only names a chunk; whoever wins the compare-and-set
UPDATE on the chunk row runs it, under a lease it renews. Results are inserted with ON CONFLICT DO NOTHING on
their kind's unique key (job and item: prompt index, layer, token for interpretations; vector index for vectors),
so a redelivered chunk never duplicates a row; the job's progress counter grows by a chunk's rows when the chunk is
marked done (`selfie_jobs.writes`, which stores results).

Every function takes a Session and leaves commit to the caller, except `complete_chunk`, which is one
transaction per chunk by contract and therefore takes a session factory. `unit_of_work` (selfie_jobs.retry)
runs a transaction so that transient database outages are retried with backoff instead of losing work.
Finding what the queue lost is `selfie_jobs.reconcile`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import and_, func, insert, or_, select, update
from sqlalchemy.orm import Session

from selfie_jobs.kinds import DEFAULT_KIND, item_tuple
from selfie_jobs.kinds.interpret import ResultRow  # noqa: F401 - its writers import it from here
from selfie_jobs.models import Chunk, EngineRun, Job, utcnow
from selfie_jobs.retry import is_transient, unit_of_work, with_db_retry  # noqa: F401 - part of this module's API
from selfie_jobs.states import FINAL_JOB_STATES, ChunkState, JobState
# Storing results is its own module; its names stay reachable here, where the chunk lifecycle's callers look.
from selfie_jobs.writes import (  # noqa: F401 - part of this module's API
    WriteOutcome,
    complete_chunk,
    complete_many,
    count_stored_rows,
    lock_job,
    storable_text,
    write_many,
    write_results,
)

log = logging.getLogger(__name__)


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes (stored as UTC); PostgreSQL aware ones. Compare them as aware UTC."""
    if value is None:
        return None
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


# --------------------------------------------------------------------------------------------------------------
# claiming
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClaimedChunk:
    """A chunk this worker now owns, with what running it needs (no ORM object crosses into the batcher)."""

    id: int
    job_id: str
    index: int
    model: str
    batch_key: str
    priority: int
    items: tuple[tuple[int, ...], ...]  # the job kind's items
    attempts: int
    spec: dict[str, Any] = field(default_factory=dict, compare=False)
    kind: str = DEFAULT_KIND
    job_state: str = field(default=JobState.RUNNING.value, compare=False)  # the job's, as the claim read it

    @property
    def size(self) -> int:
        return len(self.items)


def _claimable(now: datetime, dead_owner: str | None = None):
    """The compare-and-set condition: queued, or running under a lease that ran out (or a known-dead owner)."""
    running_free = and_(Chunk.state == ChunkState.RUNNING, Chunk.lease_expires_at < now)
    if dead_owner is not None:
        running_free = or_(running_free, and_(Chunk.state == ChunkState.RUNNING, Chunk.owner == dead_owner))
    open_job = select(Job.id).where(Job.id == Chunk.job_id, Job.state.in_([JobState.QUEUED, JobState.RUNNING]))
    return and_(or_(Chunk.state == ChunkState.QUEUED, running_free), open_job.exists())


def _load_claimed(session: Session, chunk_ids: Sequence[int]) -> list[ClaimedChunk]:
    if not chunk_ids:
        return []
    # Plain columns, not ORM objects: the claim's UPDATE bypassed the session, and an object the caller read
    # before it (e.g. to judge its owner) would come back with its old owner and attempts.
    rows = session.connection().execute(
        select(Chunk.id, Chunk.job_id, Chunk.index, Chunk.model, Chunk.batch_key, Chunk.priority, Chunk.items,
               Chunk.attempts, Job.spec, Job.kind, Job.state)
        .join(Job, Job.id == Chunk.job_id).where(Chunk.id.in_(list(chunk_ids)))
    ).all()
    by_id = {
        row.id: ClaimedChunk(
            id=row.id,
            job_id=row.job_id,
            index=row.index,
            model=row.model,
            batch_key=row.batch_key,
            priority=row.priority,
            items=tuple(item_tuple(item) for item in row.items),
            attempts=row.attempts,
            spec=row.spec or {},
            kind=row.kind or DEFAULT_KIND,
            job_state=str(row.state),
        )
        for row in rows
    }
    return [by_id[i] for i in chunk_ids if i in by_id]


def claim_chunk(
    session: Session,
    chunk_id: int,
    owner: str,
    lease_seconds: float,
    *,
    now: datetime | None = None,
    dead_owner: str | None = None,
    model: str | None = None,
) -> ClaimedChunk | None:
    """Take one chunk by compare-and-set; None when someone else holds it, it is finished, or its job is closed.

    `dead_owner`: the current owner, already judged dead by the caller (`selfie_jobs.liveness.owner_is_alive`): its
    lease is taken over at once instead of waiting for it to expire. `model`: only a chunk of this model is taken (a
    worker can receive another model's message, and a claim it cannot run must not use up an attempt).
    The caller commits.
    """
    won = _take(session, [chunk_id], owner, lease_seconds, now or utcnow(), dead_owner=dead_owner, model=model)
    if not won:
        return None
    claimed = _load_claimed(session, won)
    return claimed[0] if claimed else None


def _take(session: Session, chunk_ids: Sequence[int], owner: str, lease_seconds: float, now: datetime, *,
          dead_owner: str | None = None, model: str | None = None) -> list[int]:
    """The compare-and-set on these chunks, in one UPDATE; returns the ids it took."""
    same_model = [Chunk.model == model] if model is not None else []
    taken = session.connection().execute(
        update(Chunk)
        .where(Chunk.id.in_(list(chunk_ids)), _claimable(now, dead_owner), *same_model)
        .values(
            state=ChunkState.RUNNING,
            owner=owner,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            attempts=Chunk.attempts + 1,
            started_at=func.coalesce(Chunk.started_at, now),
            error=None,
        )
        .returning(Chunk.id)
    ).scalars().all()
    won = set(taken)
    return [i for i in chunk_ids if i in won]


def claim_more(
    session: Session,
    owner: str,
    model: str,
    batch_key: str,
    max_items: int,
    lease_seconds: float,
    *,
    exclude: Iterable[int] = (),
    now: datetime | None = None,
) -> list[ClaimedChunk]:
    """Claim further queued chunks of the same model and engine settings (any job) for one cross-job batch.

    Ordered by priority (9 = most urgent first) then id (first come, first served), up to
    `max_items` interpretations in all. They are taken by the same compare-and-set as `claim_chunk` (one UPDATE for
    all of them), so two workers racing for the same candidates never both get one. The caller commits.

    On PostgreSQL the candidates are read FOR UPDATE SKIP LOCKED: a chunk another claimer holds is passed over, never
    waited for. Waiting here, with the first chunk already locked, let two workers that each held the chunk the other
    wanted deadlock (one deadlock per 157 engine runs with two workers); this way a claim waits at most once, for its
    first chunk, while it holds nothing. SQLite has one writer at a time and needs no such order.
    """
    if max_items <= 0:
        return []
    now = now or utcnow()
    excluded = list(exclude)
    query = (
        select(Chunk.id, Chunk.size)
        .where(Chunk.model == model, Chunk.batch_key == batch_key, Chunk.state == ChunkState.QUEUED)
        .order_by(Chunk.priority.desc(), Chunk.id)
        .limit(max(1, max_items))
        .with_for_update(skip_locked=True)
    )
    if excluded:
        query = query.where(Chunk.id.not_in(excluded))
    chosen: list[int] = []
    budget = max_items
    for chunk_id, size in session.connection().execute(query).all():
        if size > budget:
            continue
        chosen.append(chunk_id)
        budget -= size
        if budget <= 0:
            break
    if not chosen:
        return []
    return _load_claimed(session, _take(session, chosen, owner, lease_seconds, now))


def _top_queued_priority(model: str) -> Any:
    """The most urgent priority among `model`'s queued chunks, as a scalar subquery: one index lookup on
    ix_chunks_claim."""
    return select(func.max(Chunk.priority)).where(Chunk.model == model,
                                                  Chunk.state == ChunkState.QUEUED).scalar_subquery()


def queue_head(session: Session, model: str) -> str | None:
    """The batch key of the queued chunk of `model` that the queue gives out next (the most urgent priority, then
    first come); None when none is queued. Two index lookups on ix_chunks_claim (the highest priority, then the
    lowest id within it), however long the backlog: ORDER BY priority DESC, id ASC would read a whole priority's
    chunks to sort them."""
    return session.connection().scalar(select(Chunk.batch_key)
                                       .where(Chunk.model == model, Chunk.state == ChunkState.QUEUED,
                                              Chunk.priority == _top_queued_priority(model))
                                       .order_by(Chunk.id).limit(1))


def queued_priority(session: Session, model: str) -> int:
    """The most urgent priority among `model`'s queued chunks (-1 when none is queued)."""
    top = session.connection().scalar(select(_top_queued_priority(model)))
    return -1 if top is None else top


def next_queued(session: Session, model: str, *, exclude_kinds: Sequence[str]) -> int | None:
    """The queued chunk of `model` to run next (priority, then first come), of an open job of any kind but
    `exclude_kinds`; None when there is none. Read only: the caller claims it (`claim_chunk`)."""
    return session.scalar(
        select(Chunk.id).join(Job, Job.id == Chunk.job_id)
        .where(Chunk.model == model, Chunk.state == ChunkState.QUEUED, Job.kind.not_in(list(exclude_kinds)),
               Job.state.in_([JobState.QUEUED, JobState.RUNNING]))
        .order_by(Chunk.priority.desc(), Chunk.id).limit(1))


def renew_leases(
    session: Session, chunk_ids: Iterable[int], owner: str, lease_seconds: float, *, now: datetime | None = None
) -> int:
    """Extend the leases this owner still holds; returns how many it still holds. The caller commits."""
    ids = list(chunk_ids)
    if not ids:
        return 0
    now = now or utcnow()
    result = session.execute(
        update(Chunk)
        .where(Chunk.id.in_(ids), Chunk.owner == owner, Chunk.state == ChunkState.RUNNING)
        .values(lease_expires_at=now + timedelta(seconds=lease_seconds))
        .execution_options(synchronize_session=False)
    )
    return result.rowcount or 0


def taken_from(session: Session, chunk_ids: Iterable[int], owner: str) -> list[int]:
    """Of the chunks `owner` holds, those it lost: queued again or running under another owner (its lease ran
    out); not those that are done or closed (cancelled, failed), which need no lease."""
    return sorted(session.scalars(
        select(Chunk.id).where(Chunk.id.in_(list(chunk_ids)),
                               or_(Chunk.state == ChunkState.QUEUED,
                                   and_(Chunk.state == ChunkState.RUNNING, Chunk.owner != owner)))))


# --------------------------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------------------------


def start_engine_run(
    session: Session, worker: str, model: str, chunks: Sequence[ClaimedChunk], *, now: datetime | None = None
) -> str:
    """Record one engine batch (which chunks and jobs it serves) and mark its jobs running; returns the run's id.
    The caller commits. (A worker records the run in its claim's transaction and marks the jobs running in a
    transaction of its own, only where a job was queued: `record_engine_run`, `mark_jobs_running`.)"""
    run_id = record_engine_run(session, worker, model, chunks, now=now)
    mark_jobs_running(session, [c.job_id for c in chunks], now=now)
    return run_id


def record_engine_run(
    session: Session, worker: str, model: str, chunks: Sequence[ClaimedChunk], *, now: datetime | None = None
) -> str:
    """Record one engine batch (which chunks and jobs it serves) and return its id; a plain insert, no lock on a
    job, so it can share the claim's transaction. The caller commits."""
    job_ids = list(dict.fromkeys(c.job_id for c in chunks))
    return session.connection().execute(insert(EngineRun).values(
        worker=worker,
        model=model,
        size=sum(c.size for c in chunks),
        chunk_ids=[c.id for c in chunks],
        job_ids=job_ids,
        started_at=now or utcnow(),
        elapsed_s=0.0,
    ).returning(EngineRun.id)).scalar_one()


def mark_jobs_running(session: Session, job_ids: Sequence[str], *, now: datetime | None = None) -> None:
    """The jobs that are still queued are running now. A job is running from the moment a worker starts on its
    first chunk (not at its first write, which would make every write touch the job's row). Not in the claim's
    transaction: the claim holds chunk locks, and a job lock taken after them would invert the order a cancel or a
    failure takes them in. The caller commits."""
    session.execute(
        update(Job).where(Job.id.in_(list(dict.fromkeys(job_ids))), Job.state == JobState.QUEUED)
        .values(state=JobState.RUNNING, started_at=func.coalesce(Job.started_at, now or utcnow()))
        .execution_options(synchronize_session=False)
    )


def finish_engine_run(session: Session, run_id: str, elapsed_s: float) -> None:
    session.execute(update(EngineRun).where(EngineRun.id == run_id).values(elapsed_s=float(elapsed_s)))


# --------------------------------------------------------------------------------------------------------------
# failure and hand-back
# --------------------------------------------------------------------------------------------------------------


def fail_job(session: Session, job_id: str, error: str, *, now: datetime | None = None) -> bool:
    """Fail an open job with a stored error; its open chunks are closed so nobody picks them up again."""
    now = now or utcnow()
    job = lock_job(session, job_id)
    if job is None or job.state in FINAL_JOB_STATES:
        return False
    count_stored_rows(session, job)
    job.state = JobState.FAILED
    job.error = error[:4000]
    job.finished_at = now
    session.execute(
        update(Chunk)
        .where(Chunk.job_id == job_id, Chunk.state.in_([ChunkState.QUEUED, ChunkState.RUNNING]))
        .values(state=ChunkState.FAILED, finished_at=now, lease_expires_at=None, error="job failed")
        .execution_options(synchronize_session=False)
    )
    session.flush()
    return True


def fail_chunk(session: Session, chunk_id: int, error: str, *, now: datetime | None = None) -> bool:
    """A chunk that cannot succeed fails its job (results of a job are all or an error)."""
    now = now or utcnow()
    chunk = session.get(Chunk, chunk_id)
    if chunk is None:
        return False
    failed = fail_job(session, chunk.job_id, error, now=now)
    session.execute(update(Chunk).where(Chunk.id == chunk_id).values(error=error[:4000]))
    return failed


def release_chunks(
    session: Session,
    chunk_ids: Iterable[int],
    owner: str,
    reason: str,
    *,
    max_attempts: int,
    started: bool = True,
    now: datetime | None = None,
) -> list[int]:
    """Hand chunks this owner holds back to the queue (state queued), or fail their job past `max_attempts`.

    `started=False`: chunks claimed for a run that never started (claimed ahead of a run that failed, or of a worker
    that stops): their claim's attempt is given back with them and they never fail their job, which did nothing
    wrong; the reason is not theirs to keep either.

    Returns the ids put back in the queue: the caller re-enqueues them after commit.
    """
    now = now or utcnow()
    requeued: list[int] = []
    held = session.execute(
        select(Chunk.id, Chunk.job_id, Chunk.index, Chunk.attempts).where(
            Chunk.id.in_(list(chunk_ids)), Chunk.owner == owner, Chunk.state == ChunkState.RUNNING
        )
    ).all()
    for chunk_id, job_id, index, attempts in held:
        if started and attempts >= max_attempts:
            fail_job(session, job_id, f"chunk {index} failed {attempts} times; last: {reason}", now=now)
            continue
        back = {"state": ChunkState.QUEUED, "owner": None, "lease_expires_at": None, "enqueued_at": now}
        if started:
            back["error"] = reason[:4000]
        else:
            back["attempts"] = Chunk.attempts - 1  # its claim counted one (a running chunk has at least one)
        put_back = session.execute(
            update(Chunk)
            .where(Chunk.id == chunk_id, Chunk.owner == owner, Chunk.state == ChunkState.RUNNING)
            .values(**back)
            .execution_options(synchronize_session=False)
        )
        if put_back.rowcount == 1:
            requeued.append(chunk_id)
    session.flush()
    return requeued
