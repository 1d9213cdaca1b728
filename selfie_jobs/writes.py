"""Storing a chunk's results: rows inserted exactly once, the chunk marked done and the job's progress and state
updated in the same transaction, nothing stored for a job that is closed.

Guarantees (the chunk lifecycle's, `selfie_jobs.chunks`):
- exactly once: rows go in with INSERT .. ON CONFLICT DO NOTHING on their kind's unique key, so a redelivered or
  re-run chunk never duplicates a row; the chunk is marked done in the transaction that stores its last rows, and
  only if this owner still holds it;
- nothing for a closed job: a job found cancelled or failed gets no rows, and the writer's chunks of it are closed;
- exactly one writer marks a job succeeded, and a cancel never overwrites it: every change of a job's state
  (a completion, a cancel, a failure) holds the job's row lock (`lock_job`), and the "no open chunk left" check is
  made under it, so it sees every completion that held the lock before.

How writers of one job stay out of each other's way (they used to queue on the job's row lock for the whole
write): on PostgreSQL the rows go in first, under a savepoint, with no lock on the job (the insert reads the job's id
from the chunk's row); then one statement finds the chunk's job and locks it, held to the commit, a share lock for
rows only (other writers' share locks do not wait on it, a cancel does) or the row lock for a completion, and
returns its state; a job found closed (or gone) then rolls the rows back. Taking the lock first would spare the
savepoint but make two writers of one job queue on the row lock while they insert (measured: 0.60-0.68 of a plain
executemany with 2 writers, against 0.86-0.97 rows first). The completion is a statement of its own that starts
once the lock is held, so its "no other open chunk" check sees every completion that held the lock before (a
statement's snapshot is taken when it starts, before any lock it waits on). The job's row is written only when a
chunk completes: progress (`jobs.done`) is the rows of done chunks, each chunk counted once when it is marked. On
SQLite, where one writer at a time holds the database anyway, the lock comes first: one no-op UPDATE of the chunk's
job takes the write lock and returns its id, state and kind (the rows' parameters are built before it, so other
writers do not wait through that Python).

One deadlock between two writers of one job remains possible on PostgreSQL, and PostgreSQL resolves it: a chunk
taken over from a worker that is still writing it (its lease ran out while it was alive), whose old owner commits a
group (`write_many`, holding the job's row lock) that inserts rows with the keys the new owner has inserted but not
committed, while the new owner waits for the job's lock. One of them gets DeadlockDetected after deadlock_timeout
(1 s), which `unit_of_work` retries; nothing is lost (the old owner's chunk is not marked: it no longer holds it).

A completing write on PostgreSQL sends SAVEPOINT, the insert (one statement for all its rows, `selfie_jobs.bulk`),
the job's lock, the completion (the chunk marked in a data-modifying CTE and the job's progress), then the commit;
on SQLite the lock, the insert, the chunk marked, the job's progress.

The statements are built and compiled once and sent through the driver on the session's connection (no ORM object,
no SQLAlchemy statement handling per call: `_DriverStatement`); rows go through `selfie_jobs.bulk`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Any

from sqlalchemy import and_, bindparam, case, func, literal, or_, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from selfie_jobs.bulk import bulk_insert
from selfie_jobs.kinds import get_kind
from selfie_jobs.locking import lock_row
from selfie_jobs.models import Chunk, Job, utcnow
from selfie_jobs.retry import unit_of_work
from selfie_jobs.states import FINAL_JOB_STATES, ChunkState, JobState

OPEN_CHUNK = (ChunkState.QUEUED, ChunkState.RUNNING)


@dataclass(frozen=True)
class WriteOutcome:
    inserted: int
    chunk_done: bool
    job_state: str | None
    skipped_reason: str | None = None


_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def storable_text(text: str | None) -> str:
    """Text as every database stores it: PostgreSQL refuses NUL in text, and a random or broken model can
    generate the token for byte 0x00; a lone surrogate (half of a UTF-16 pair, which a broken tokenizer's decoding
    can leave) cannot be encoded as UTF-8 by either driver. Each becomes U+FFFD (the replacement character),
    visibly."""
    text = text or ""
    return text if text.isascii() and "\x00" not in text else _UNSTORABLE.sub("\ufffd", text)


def lock_job(session: Session, job_id: str) -> Job | None:
    """Take the job's row lock (``locking.lock_row``) before reading anything else of it, and return the job as it
    is now.

    Every change of a job's state goes through here or takes the same lock (a cancel, a failure, the writer that
    completes a chunk), so they are serialised per job. FOR NO KEY UPDATE, not FOR UPDATE: result inserts hold the
    job row's KEY SHARE lock (their foreign key) until they commit, and FOR UPDATE would wait on them while they
    wait on this lock for their completion step.
    """
    lock_row(session, Job, job_id)
    return session.execute(
        select(Job).where(Job.id == job_id).with_for_update(key_share=True).execution_options(populate_existing=True)
    ).scalar_one_or_none()


def count_stored_rows(session: Session, job: Job) -> None:
    """Set a job that is closing (cancelled, failed) to the rows it has stored: its progress counted only the
    chunks that completed, and rows of chunks cut short stay stored. Called under the job's lock, which a writer's
    check of the job's state waits on, so no row is added after this count."""
    table = get_kind(job.kind).table
    job.done = session.scalar(select(func.count()).select_from(table).where(table.job_id == job.id)) or 0


# -- the statements, built once ------------------------------------------------------------------------------


@cache
def _statements(postgres: bool) -> dict[str, Any]:
    # Parameters are named w_*: in an UPDATE, a parameter named after a column would be taken as a SET value.
    chunk_id, job_id, owner = bindparam("w_chunk"), bindparam("w_job"), bindparam("w_owner")
    now = bindparam("w_now", type_=Job.finished_at.type)
    if postgres:
        # The chunk's job found and locked in one statement: FOR NO KEY UPDATE is the row lock (lock_job's),
        # FOR SHARE the share lock for rows only; either waits on a cancel and reads the job as it committed it.
        job_of_chunk = select(Job.id, Job.state, Job.kind).join(Chunk, Chunk.job_id == Job.id) \
            .where(Chunk.id == chunk_id)
        lock = job_of_chunk.with_for_update(key_share=True, of=Job)
        share = job_of_chunk.with_for_update(read=True, of=Job)
    else:
        # lock_job in one statement: a no-op UPDATE of a plain column (SQLite's write lock; a SELECT would hold
        # nothing) of the chunk's job, whose RETURNING reads the row as the last holder committed it
        lock = share = update(Job).where(Job.id == select(Chunk.job_id).where(Chunk.id == chunk_id)
                                         .scalar_subquery()) \
            .values(kind=Job.kind).returning(Job.id, Job.state, Job.kind)
    return {
        "lock": lock,
        "share": share,
        "mark_done": update(Chunk).where(Chunk.id == chunk_id, Chunk.owner == owner,
                                         Chunk.state == ChunkState.RUNNING)
        .values(state=ChunkState.DONE, finished_at=now, lease_expires_at=None),
        "close": update(Chunk).where(
            Chunk.job_id == job_id, Chunk.state.in_(OPEN_CHUNK),
            or_(Chunk.id == chunk_id, and_(Chunk.owner == owner, Chunk.state == ChunkState.RUNNING)))
        .values(state=bindparam("w_closed_state"), finished_at=now, lease_expires_at=None),
    }


@cache
def _progress(kind: str, postgres: bool) -> Any:
    """The completion's job update: the chunk's rows added to `done`, and the job succeeded when no other chunk is
    open. On PostgreSQL it also marks the chunk, in a data-modifying CTE (one round trip), and changes the job only
    if the chunk was marked; the statement does not see its CTE's change, hence `id != chunk`."""
    chunk_id, job_id = bindparam("w_chunk"), bindparam("w_job")
    now = bindparam("w_now", type_=Job.finished_at.type)
    table = get_kind(kind).table
    chunk_rows = select(func.count()).select_from(table).where(table.chunk_id == chunk_id).scalar_subquery()
    # IN of one parameter per state, not an expanding one: the statement is compiled once (_driver_statement)
    others_open = select(Chunk.id).where(Chunk.job_id == job_id, Chunk.id != chunk_id,
                                         Chunk.state.in_([literal(state) for state in OPEN_CHUNK])).exists()
    where = [Job.id == job_id]
    if postgres:
        marked = _statements(postgres)["mark_done"].returning(Chunk.id).cte("marked")
        where.append(select(marked.c.id).exists())
    return (
        update(Job).where(*where)
        .values(done=Job.done + chunk_rows, started_at=func.coalesce(Job.started_at, now),
                state=case((others_open, JobState.RUNNING), else_=JobState.SUCCEEDED),
                finished_at=case((others_open, Job.finished_at), else_=now))
        .returning(Job.state)
    )


@dataclass(frozen=True)
class _DriverStatement:
    """A statement compiled once for a dialect and run through the driver's execute: SQLAlchemy's own work per
    execution (cache key, parameters, result set-up) was about a tenth of a SQLite write's time for the write's
    three small statements (benchmarks/README.md "Database cycle"). Parameters go through their types' bind
    processors as SQLAlchemy would send them."""

    compiled: Any
    processors: dict[str, Callable[[Any], Any]]

    @property
    def sql(self) -> str:
        return self.compiled.string

    def run(self, conn: Connection, params: dict[str, Any]) -> Any:
        values = self.compiled.construct_params(params)
        for name, process in self.processors.items():
            values[name] = process(values[name])
        if self.compiled.positional:
            return conn.exec_driver_sql(self.sql, tuple(values[name] for name in self.compiled.positiontup))
        return conn.exec_driver_sql(self.sql, values)


_DRIVER_STATEMENTS: dict[tuple[str, str], _DriverStatement] = {}


def _driver_statement(conn: Connection, name: str, stmt: Any) -> _DriverStatement:
    key = (conn.dialect.name, name)
    found = _DRIVER_STATEMENTS.get(key)
    if found is None:
        compiled = stmt.compile(dialect=conn.dialect)
        processors = {compiled.bind_names[param]: process for param in compiled.binds.values()
                      if (process := param.type.dialect_impl(conn.dialect).bind_processor(conn.dialect)) is not None}
        found = _DRIVER_STATEMENTS.setdefault(key, _DriverStatement(compiled, processors))
    return found


# -- the write ------------------------------------------------------------------------------------------------


def _rows_insert(session: Session, chunk_id: int, rows: Sequence[Any], *, engine_run_id: str, worker: str,
                 model: str, now: datetime) -> Callable[[], int]:
    """The insert of the rows, its parameters built now, before the job's lock is taken (on SQLite the lock is the
    database's, and building them is a third of a millisecond of Python per 64 rows that other writers would wait
    through); calling it inserts them and returns how many were new. The statement reads the job's id from the
    chunk's row, so nothing has to find it first."""
    # The job kind's row type names its table and the item columns of its unique key (selfie_jobs.kinds).
    row_type = type(rows[0])
    shared = {"chunk_id": chunk_id, "engine_run_id": engine_run_id, "worker": worker, "model": model,
              "created_at": now}
    values = [r.values(storable_text) for r in rows]
    insert = bulk_insert(session, row_type.TABLE.__table__, ("job_id", *shared, *values[0]),
                         ("job_id", *row_type.ITEM_COLUMNS), ("job_id", *shared), Chunk.__table__)
    params = insert.parameters(shared, values)
    return lambda: insert.execute(session, params)


def _closed(conn: Connection, job_id: str, job_state: str, chunk_id: int, owner: str, now: datetime) -> WriteOutcome:
    # The worker stops working on a closed job at this answer, so this chunk and every other chunk of the job it
    # holds are closed now: nobody else would, and they would stay `running` under a closed job for good.
    closed_state = ChunkState.CANCELLED if job_state == JobState.CANCELLED else ChunkState.FAILED
    conn.execute(_statements(conn.dialect.name == "postgresql")["close"],
                 {"w_job": job_id, "w_chunk": chunk_id, "w_owner": owner, "w_now": now, "w_closed_state": closed_state})
    return WriteOutcome(0, False, job_state, f"job is {job_state}")


def write_results(
    session: Session,
    chunk_id: int,
    owner: str,
    rows: Sequence[Any],
    *,
    engine_run_id: str,
    worker: str,
    model: str,
    complete: bool,
    now: datetime | None = None,
    job_row_lock: bool = False,
) -> WriteOutcome:
    """Store some (or the last) results of one chunk; with `complete`, mark the chunk done. The caller commits.

    Rows already present (a redelivered or re-run chunk) are skipped by the unique key. Nothing is written for a job
    that is cancelled or failed. The chunk is marked done only if this owner still holds it, and then its rows count
    in the job's `done`. See the module docstring for the locks. `job_row_lock`: check the job's state under its
    row lock even for rows alone (PostgreSQL), for a transaction that completes a chunk of the job later
    (`write_many`).
    """
    now = now or utcnow()
    conn = session.connection()
    postgres = conn.dialect.name == "postgresql"
    statements = _statements(postgres)
    lock_name = "lock" if complete or job_row_lock else "share"
    lock = _driver_statement(conn, lock_name, statements[lock_name])
    params = {"w_chunk": chunk_id}
    rows_insert = None
    if rows:
        rows_insert = _rows_insert(session, chunk_id, rows, engine_run_id=engine_run_id, worker=worker, model=model,
                                   now=now)
    inserted = 0
    if postgres:
        # The rows first, with no lock on the job, under a plain SAVEPOINT, never released: the commit keeps the rows
        # without it, and a RELEASE is one more round trip per write (the ORM's begin_nested() sends one).
        if rows_insert:
            conn.exec_driver_sql("SAVEPOINT selfie_write_rows")
            inserted = rows_insert()
        # then the job's state under its lock, held to the commit: a closed (or deleted) job takes the rows back
        found = lock.run(conn, params).first()
        if rows_insert and (found is None or found.state in FINAL_JOB_STATES):
            conn.exec_driver_sql("ROLLBACK TO SAVEPOINT selfie_write_rows")
    else:  # SQLite: the database's write lock first, then the rows
        found = lock.run(conn, params).first()
    if found is None:
        return WriteOutcome(0, False, None, "chunk is gone")
    job_id, job_state, kind = found
    if job_state in FINAL_JOB_STATES:
        return _closed(conn, job_id, job_state, chunk_id, owner, now)
    if rows_insert and not postgres:
        inserted = rows_insert()
    if not complete:
        return WriteOutcome(inserted, False, job_state)

    # A statement that starts now, with the job's row lock held: it sees every completion that held the lock before.
    params = {"w_chunk": chunk_id, "w_job": job_id, "w_owner": owner, "w_now": now}
    if not postgres:
        if _driver_statement(conn, "mark_done", statements["mark_done"]).run(conn, params).rowcount != 1:
            return WriteOutcome(inserted, False, job_state)
    state = _driver_statement(conn, "progress:" + kind, _progress(kind, postgres)).run(conn, params).scalar()
    if state is None:  # PostgreSQL: the chunk was not marked (another owner holds it now, or it is finished)
        return WriteOutcome(inserted, False, job_state)
    return WriteOutcome(inserted, True, state)


def write_many(
    session: Session,
    writes: Sequence[tuple[int, Sequence[Any], bool]],
    owner: str,
    *,
    engine_run_id: str,
    worker: str,
    model: str,
) -> list[WriteOutcome]:
    """Several writes `(chunk id, rows, complete)` of chunks of ONE job, in order, in the session's transaction (one
    commit for all of them: a writer that fell behind catches up). The caller commits.

    Each write is `write_results`, with its guarantees. If any of them completes a chunk, every one of them checks
    the job's state under the job's row lock: a transaction that took the share lock first and the row lock
    later would deadlock with another writer of the job doing the same. One job only, so the transaction holds one
    job's row lock at most and two such transactions cannot wait on each other's jobs.
    """
    row_lock = any(complete for _, _, complete in writes)
    return [write_results(session, chunk_id, owner, rows, engine_run_id=engine_run_id, worker=worker, model=model,
                          complete=complete, job_row_lock=row_lock)
            for chunk_id, rows, complete in writes]


def complete_many(
    session_factory: Callable[[], Session],
    writes: Sequence[tuple[int, Sequence[Any], bool]],
    owner: str,
    *,
    engine_run_id: str,
    worker: str,
    model: str,
    retry_seconds: float = 0.0,
) -> list[WriteOutcome]:
    """`write_many` in one transaction of its own, retried whole with backoff on transient database errors."""

    return unit_of_work(
        session_factory,
        lambda session: write_many(session, writes, owner, engine_run_id=engine_run_id, worker=worker, model=model),
        retry_seconds,
    )


def complete_chunk(
    session_factory: Callable[[], Session],
    chunk_id: int,
    owner: str,
    rows: Sequence[Any],
    *,
    engine_run_id: str,
    worker: str,
    model: str,
    complete: bool = True,
    retry_seconds: float = 0.0,
) -> WriteOutcome:
    """`write_results` in one transaction of its own, retried with backoff on transient database errors."""

    return unit_of_work(
        session_factory,
        lambda session: write_results(
            session, chunk_id, owner, rows, engine_run_id=engine_run_id, worker=worker, model=model, complete=complete
        ),
        retry_seconds,
    )
