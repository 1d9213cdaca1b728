"""Check-then-write steps of the job domain under a forced interleaving of two transactions, on real SQLite and
PostgreSQL (see tests/locksupport.py for how the order is forced without sleeps)."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from selfie_jobs import chunks as C
from selfie_jobs.auth import LOCAL_PRINCIPAL, create_key
from selfie_jobs.db import create_db_engine, get_sessionmaker
from selfie_jobs.models import Chunk, Job
from selfie_jobs.queries import cancel_job, visible_job
from selfie_jobs.settings import Settings
from selfie_jobs.submission import SubmissionError, check_quota
from tests.locksupport import LockStep
from tests.unit.jobs.factories import make_job


def run_while_a_cancel_commits(db, other_engine, job_id: str, work):
    """Run `work` (a transaction on `other_engine`) up to its first locking statement while a cancel of the job,
    not yet committed, holds the job's lock; then commit the cancel. Returns what `work` returned."""
    with db() as canceller:
        _, cancelled = cancel_job(canceller, job_id, LOCAL_PRINCIPAL)  # holds the job's lock, not committed
        assert cancelled
        writer = LockStep(other_engine, work).start()
        canceller.commit()
    return writer.join()


@pytest.fixture
def db(migrated_database_url):
    return get_sessionmaker(migrated_database_url)


@pytest.fixture
def other_engine(migrated_database_url):
    """The engine of the other party (its statements are watched; the test's own go through `db`)."""
    engine = create_db_engine(migrated_database_url)
    yield engine
    engine.dispose()


def test_cancel_never_overwrites_a_job_that_succeeded_while_it_ran(db, other_engine):
    with db() as s, s.begin():
        job = make_job(s, chunk_size=8)
        job_id, chunk_id = job.id, s.scalar(select(Chunk.id).where(Chunk.job_id == job.id))
    with db() as s, s.begin():
        claimed = C.claim_chunk(s, chunk_id, "w1", 60)
    rows = [C.ResultRow(p, layer, t, "tok", "text", [1], [0.5], 0.5) for p, layer, t in claimed.items]

    def cancel():  # as POST /v1/jobs/{id}/cancel does it: the job is read first, then cancelled
        with Session(other_engine) as s:
            assert visible_job(s, job_id, LOCAL_PRINCIPAL).state == "running"
            _, cancelled = cancel_job(s, job_id, LOCAL_PRINCIPAL)
            s.commit()
            return cancelled

    with db() as s, s.begin():  # the worker starts its engine run: the job is running from here
        C.start_engine_run(s, "w1", "tiny", [claimed])
    with db() as worker:
        outcome = C.write_results(worker, chunk_id, "w1", rows, engine_run_id="r", worker="w1", model="tiny",
                                  complete=True)
        assert outcome.job_state == "succeeded"
        canceller = LockStep(other_engine, cancel).start()  # it has read "running"; its write waits on the worker
        worker.commit()
    assert canceller.join() is False
    with db() as s:
        job = s.get(Job, job_id)
        assert (job.state, job.error, job.done) == ("succeeded", None, len(rows))


def test_quota_check_counts_the_job_of_a_concurrent_submit_of_the_same_key(db, other_engine):
    settings = Settings(_env_file=None)
    with db() as s, s.begin():
        key, _ = create_key(s, "k", daily_quota=10)
        key_id = key.id

    def second_submit():
        with Session(other_engine) as s:
            check_quota(s, key_id, 8, settings)

    with db() as first:
        check_quota(first, key_id, 8, settings)
        job = make_job(first)  # 8 interpretations, stored in the same transaction as the check
        job.owner_key_id = key_id
        first.flush()
        second = LockStep(other_engine, second_submit).start()
        first.commit()
    with pytest.raises(SubmissionError) as refused:
        second.join()
    assert refused.value.status == 429 and "8 of 10" in refused.value.message


def test_a_row_lock_leaves_the_row_as_it_was_and_sets_no_key(db, other_engine):
    """lock_row's no-op UPDATE sets a plain column: not the primary key (SQLite then checks every row that
    references it: all of a key's jobs on each submit), and not updated_at (an onupdate default)."""
    from datetime import datetime, timezone

    from sqlalchemy import event

    from selfie_jobs.audit_models import Audit, PromptSet
    from selfie_jobs.locking import lock_row
    from selfie_jobs.models import ApiKey

    then = datetime(2026, 1, 2, tzinfo=timezone.utc)
    with db() as s, s.begin():
        key, _ = create_key(s, "k")
        prompt_set = PromptSet(name="ps", source="upload", size=0)
        s.add(prompt_set)
        s.flush()
        audit = Audit(name="a", model="tiny", prompt_set_id=prompt_set.id, targets={}, detectors=[],
                      created_at=then, updated_at=then)
        s.add(audit)
        s.flush()
        key_id, audit_id = key.id, audit.id
    statements = []
    event.listen(other_engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    with Session(other_engine) as s, s.begin():
        lock_row(s, ApiKey, key_id)
        lock_row(s, Audit, audit_id)
    updates = [sql for sql in statements if sql.lstrip().upper().startswith("UPDATE")]
    assert len(updates) == 2 and not any("SET id" in sql for sql in updates), updates
    with db() as s:
        assert s.get(Audit, audit_id).updated_at.replace(tzinfo=timezone.utc) == then
        assert s.get(ApiKey, key_id).name == "k"


@pytest.mark.parametrize("database_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
def test_claiming_companions_passes_over_a_chunk_another_claim_holds_instead_of_waiting(db, other_engine):
    """Two workers claiming in opposite orders used to deadlock: each held the chunk the other's claim_more waited
    for. A claim now skips the chunks another open claim holds, so it never waits with chunks locked."""
    import threading

    with db() as s, s.begin():
        job = make_job(s, chunk_size=2)  # 4 chunks of 2
        ids = list(s.scalars(select(Chunk.id).where(Chunk.job_id == job.id).order_by(Chunk.index)))
    result: list = []

    def second_worker():
        with Session(other_engine) as s, s.begin():
            first = C.claim_chunk(s, ids[0], "w2", 60)
            more = C.claim_more(s, "w2", "tiny", "bk1", 8, 60, exclude=[first.id])
            result.append([first.id, *(c.id for c in more)])

    with db() as first_worker:
        assert C.claim_chunk(first_worker, ids[1], "w1", 60) is not None  # held, not committed
        thread = threading.Thread(target=second_worker, daemon=True)
        thread.start()
        thread.join(20)
        assert not thread.is_alive(), "the second claim waited for the chunk the first one holds"
        first_worker.commit()
    assert result == [[ids[0], ids[2], ids[3]]]
    with db() as s:
        owners = dict(s.execute(select(Chunk.id, Chunk.owner).where(Chunk.job_id == job.id)).all())
    assert owners == {ids[0]: "w2", ids[1]: "w1", ids[2]: "w2", ids[3]: "w2"}


def test_rows_written_while_a_cancel_commits_are_not_stored(db, other_engine):
    """A writer inserts without the job's lock and checks the job's state after: a cancel that commits meanwhile
    leaves none of its rows stored (PostgreSQL rolls them back to the savepoint; SQLite's writer waits first)."""
    from selfie_jobs.models import Interpretation

    with db() as s, s.begin():
        job = make_job(s, chunk_size=8)
        job_id, chunk_id = job.id, s.scalar(select(Chunk.id).where(Chunk.job_id == job.id))
    with db() as s, s.begin():
        claimed = C.claim_chunk(s, chunk_id, "w1", 60)
        C.start_engine_run(s, "w1", "tiny", [claimed])
    rows = [C.ResultRow(p, layer, t, "tok", "text", [1], [0.5], 0.5) for p, layer, t in claimed.items[:4]]

    def write():
        with Session(other_engine) as s, s.begin():
            return C.write_results(s, chunk_id, "w1", rows, engine_run_id="r", worker="w1", model="tiny",
                                   complete=False)

    outcome = run_while_a_cancel_commits(db, other_engine, job_id, write)
    assert (outcome.inserted, outcome.chunk_done, outcome.skipped_reason) == (0, False, "job is cancelled")
    with db() as s:
        stored = s.scalar(select(func.count()).select_from(Interpretation).where(Interpretation.job_id == job_id))
        assert stored == 0 and s.get(Chunk, chunk_id).state == "cancelled"
        assert s.get(Job, job_id).state == "cancelled"
