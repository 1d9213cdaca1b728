"""Chunk lifecycle against real SQLite and PostgreSQL: claims, races, redelivery, cancellation, reconciliation."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError, OperationalError

from selfie_jobs import chunks as C
from selfie_jobs import liveness
from selfie_jobs import reconcile as R
from selfie_jobs.cards import WorkerIdentity, heartbeat
from selfie_jobs.db import get_sessionmaker
from selfie_jobs.models import Chunk, EngineRun, Interpretation, Job, utcnow
from selfie_jobs.settings import Settings
from tests.unit.jobs.factories import make_job


@pytest.fixture
def db(migrated_database_url):
    return get_sessionmaker(migrated_database_url)


def _rows(chunk):
    return [C.ResultRow(p, l, t, f"tok{t}", f"text {p} {l} {t}", [1, 2], [0.5, 0.25], 0.375) for p, l, t in chunk.items]


def _job(db, **kw):
    with db() as s, s.begin():
        job = make_job(s, **kw)
        return job.id, [c for c in s.scalars(select(Chunk.id).where(Chunk.job_id == job.id).order_by(Chunk.index))]


def test_claim_is_compare_and_set(db):
    _, ids = _job(db)
    with db() as s, s.begin():
        got = C.claim_chunk(s, ids[0], "w1", 60)
    assert got is not None
    assert got.attempts == 1 and got.items[0] == (0, 0, 0) and got.spec["injection"]["k"] == 1
    with db() as s, s.begin():
        assert C.claim_chunk(s, ids[0], "w2", 60) is None
        row = s.get(Chunk, ids[0])
        assert (row.state, row.owner) == ("running", "w1")


def test_two_sessions_race_for_one_chunk_only_one_wins(db):
    _, ids = _job(db)
    barrier = threading.Barrier(2)
    wins: list[str] = []
    errors: list[BaseException] = []

    def claim(owner):
        try:
            with db() as s, s.begin():
                barrier.wait(5)
                if C.claim_chunk(s, ids[0], owner, 60) is not None:
                    wins.append(owner)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert len(wins) == 1
    with db() as s:
        assert s.get(Chunk, ids[0]).owner == wins[0]


def test_expired_lease_and_dead_owner_can_be_taken_over(db):
    _, ids = _job(db)
    now = utcnow()
    with db() as s, s.begin():
        assert C.claim_chunk(s, ids[0], "w1", 30, now=now)
    with db() as s, s.begin():
        assert C.claim_chunk(s, ids[0], "w2", 30, now=now + timedelta(seconds=10)) is None
        assert C.claim_chunk(s, ids[0], "w2", 30, now=now + timedelta(seconds=10), dead_owner="w9") is None
        taken = C.claim_chunk(s, ids[0], "w2", 30, now=now + timedelta(seconds=10), dead_owner="w1")
    assert taken is not None and taken.attempts == 2
    with db() as s, s.begin():
        taken = C.claim_chunk(s, ids[0], "w3", 30, now=now + timedelta(seconds=60))
    assert taken is not None and taken.attempts == 3


def test_a_worker_has_lost_only_the_chunks_queued_again_or_taken_over(db):
    """What `renew_leases` does not renew is not all lost: a held chunk that is done or closed needs no lease (a
    worker's warning named those every second after a cancel)."""
    _, ids = _job(db, items=[(0, 0, t) for t in range(4)], chunk_size=1)
    now = utcnow()
    with db() as s, s.begin():
        for chunk_id in ids:
            assert C.claim_chunk(s, chunk_id, "w1", 30, now=now)
        s.get(Chunk, ids[0]).state = "done"
        s.get(Chunk, ids[1]).state = "cancelled"
        s.get(Chunk, ids[2]).state = "queued"
    with db() as s, s.begin():
        assert C.claim_chunk(s, ids[3], "w2", 30, now=now + timedelta(seconds=60)) is not None
    with db() as s, s.begin():
        assert C.renew_leases(s, ids, "w1", 30) == 0
        assert C.taken_from(s, ids, "w1") == [ids[2], ids[3]]
        assert C.taken_from(s, ids, "w2") == [ids[2]]


def test_a_takeover_reports_the_claim_as_it_is_stored(db):
    _, ids = _job(db)
    with db() as s, s.begin():
        assert C.claim_chunk(s, ids[0], "w1", 60)
    with db() as s, s.begin():
        before = s.get(Chunk, ids[0])  # read first, to judge the owner, as a worker does
        assert (before.owner, before.attempts) == ("w1", 1)
        taken = C.claim_chunk(s, ids[0], "w2", 60, dead_owner="w1")
    assert taken.attempts == 2  # not the 1 of the row read before the claim (the attempt limit counts on it)


def test_claim_more_batches_across_jobs_by_priority_and_key(db):
    _, a = _job(db, priority=5)
    _, b = _job(db, priority=8)
    _, other_key = _job(db, batch_key="other")
    _, other_model = _job(db, model="big")
    with db() as s, s.begin():
        first = C.claim_chunk(s, a[0], "w1", 60)
        more = C.claim_more(s, "w1", "tiny", "bk1", 8, 60, exclude=[first.id])
    # job b (priority 8, more urgent) first, then the rest of job a; 4 + 4 = 8 items fit, nothing of another key or model
    assert [c.id for c in more] == [b[0], b[1]]
    with db() as s:
        states = dict(s.execute(select(Chunk.id, Chunk.state)).all())
    assert all(states[i] == "queued" for i in other_key + other_model + a[1:])
    with db() as s, s.begin():
        assert C.claim_more(s, "w2", "tiny", "bk1", 3, 60) == []  # no queued chunk of <= 3 items fits
        assert [c.id for c in C.claim_more(s, "w2", "tiny", "bk1", 100, 60)] == [a[1]]


def test_redelivered_chunk_inserts_nothing_twice_and_job_succeeds(db):
    job_id, ids = _job(db)
    with db() as s, s.begin():
        claimed = [C.claim_chunk(s, i, "w1", 60) for i in ids]
        run_id = C.start_engine_run(s, "w1", "tiny", claimed)
    first = C.complete_chunk(db, ids[0], "w1", _rows(claimed[0]), engine_run_id=run_id, worker="w1", model="tiny")
    assert (first.inserted, first.chunk_done, first.job_state) == (4, True, "running")
    # the same results again (a redelivered message, a re-run after a crash): nothing new
    again = C.complete_chunk(db, ids[0], "w1", _rows(claimed[0]), engine_run_id=run_id, worker="w1", model="tiny")
    assert again.inserted == 0 and not again.chunk_done
    # streaming: half of the second chunk, then the rest with complete=True
    rows = _rows(claimed[1])
    part = C.complete_chunk(db, ids[1], "w1", rows[:2], engine_run_id=run_id, worker="w1", model="tiny", complete=False)
    assert part.inserted == 2 and not part.chunk_done
    last = C.complete_chunk(db, ids[1], "w1", rows, engine_run_id=run_id, worker="w1", model="tiny")
    assert (last.inserted, last.chunk_done, last.job_state) == (2, True, "succeeded")
    with db() as s:
        job = s.get(Job, job_id)
        assert (job.done, job.total, job.state) == (8, 8, "succeeded")
        assert job.finished_at is not None
        assert s.scalar(select(func.count()).select_from(Interpretation)) == 8
        run = s.get(EngineRun, run_id)
        assert run.chunk_ids == ids and run.job_ids == [job_id]


def test_nul_characters_are_stored_as_replacement_characters(db):
    job_id, ids = _job(db)
    with db() as s, s.begin():
        c = C.claim_chunk(s, ids[0], "w1", 60)
    rows = [C.ResultRow(p, l, t, "a\x00b", "x\x00\x00y", [0], [0.1], 0.1) for p, l, t in c.items]
    assert C.complete_chunk(db, ids[0], "w1", rows, engine_run_id="r", worker="w1", model="tiny").inserted == 4
    with db() as s:
        texts = set(s.execute(select(Interpretation.source_token, Interpretation.text)).all())
    assert texts == {("a\ufffdb", "x\ufffd\ufffdy")}


def test_unique_key_holds_in_the_database(db):
    job_id, ids = _job(db)
    with db() as s, s.begin():
        c = C.claim_chunk(s, ids[0], "w1", 60)
    C.complete_chunk(db, ids[0], "w1", _rows(c), engine_run_id="r", worker="w1", model="tiny")
    with pytest.raises(IntegrityError), db() as s, s.begin():
        s.add(Interpretation(job_id=job_id, prompt_index=0, layer=0, token=0, source_token="", text="", token_ids=[],
                             relevancy=[], mean_relevancy=0.0, chunk_id=ids[0], engine_run_id="r", worker="x",
                             model="tiny"))


def test_only_the_owner_marks_done(db):
    _, ids = _job(db)
    now = utcnow()
    with db() as s, s.begin():
        mine = C.claim_chunk(s, ids[0], "w1", 5, now=now - timedelta(seconds=60))
        C.claim_chunk(s, ids[0], "w2", 60, now=now)  # lease of w1 ran out, w2 took over
    out = C.complete_chunk(db, ids[0], "w1", _rows(mine), engine_run_id="r", worker="w1", model="tiny")
    assert out.inserted == 4 and not out.chunk_done  # rows are kept (identical), the chunk stays w2's
    out = C.complete_chunk(db, ids[0], "w2", _rows(mine), engine_run_id="r2", worker="w2", model="tiny")
    assert out.inserted == 0 and out.chunk_done


def test_cancelled_job_gets_no_rows_and_no_claims(db):
    job_id, ids = _job(db)
    with db() as s, s.begin():
        c = C.claim_chunk(s, ids[0], "w1", 60)
        s.get(Job, job_id).state = "cancelled"
    out = C.complete_chunk(db, ids[0], "w1", _rows(c), engine_run_id="r", worker="w1", model="tiny")
    assert out.inserted == 0 and out.skipped_reason == "job is cancelled"
    with db() as s, s.begin():
        assert C.claim_chunk(s, ids[1], "w1", 60) is None
        assert s.get(Chunk, ids[0]).state == "cancelled"
        assert s.scalar(select(func.count()).select_from(Interpretation)) == 0


def test_a_write_to_a_cancelled_job_closes_every_chunk_of_it_the_writer_holds(db):
    # the worker stops working on the job at that answer: its other held chunks must not stay `running`
    job_id, ids = _job(db, items=[(0, 0, t) for t in range(6)], chunk_size=2)
    with db() as s, s.begin():
        mine = [C.claim_chunk(s, i, "w1", 60) for i in ids[:2]]
        C.claim_chunk(s, ids[2], "w2", 60)
        s.get(Job, job_id).state = "cancelled"
    out = C.complete_chunk(db, ids[0], "w1", _rows(mine[0]), engine_run_id="r", worker="w1", model="tiny")
    assert out.skipped_reason == "job is cancelled"
    with db() as s:
        states = {i: s.get(Chunk, i).state for i in ids}
    assert states == {ids[0]: "cancelled", ids[1]: "cancelled", ids[2]: "running"}  # w2 closes its own


def test_fail_chunk_fails_the_job_with_its_error(db):
    job_id, ids = _job(db)
    other_id, other = _job(db)
    with db() as s, s.begin():
        C.claim_chunk(s, ids[0], "w1", 60)
        assert C.fail_chunk(s, ids[0], "SelfieInputError: layer 99 out of range")
    with db() as s:
        job = s.get(Job, job_id)
        assert job.state == "failed" and "layer 99" in job.error and job.finished_at
        assert {s.get(Chunk, i).state for i in ids} == {"failed"}
        assert s.get(Job, other_id).state == "queued"


def test_release_hands_back_then_fails_after_max_attempts(db):
    job_id, ids = _job(db)
    with db() as s, s.begin():
        C.claim_chunk(s, ids[0], "w1", 60)
        assert C.release_chunks(s, [ids[0]], "w1", "CUDA error", max_attempts=2) == [ids[0]]
        assert s.get(Chunk, ids[0]).state == "queued"
        C.claim_chunk(s, ids[0], "w1", 60)
        assert C.release_chunks(s, [ids[0]], "w1", "CUDA error", max_attempts=2) == []
    with db() as s:
        job = s.get(Job, job_id)
        assert job.state == "failed" and "failed 2 times" in job.error


def test_reconcile_finds_lost_chunks_and_times_out_jobs(db):
    now = utcnow()
    settings = Settings(enqueue_grace_seconds=60, worker_alive_seconds=45, job_timeout_seconds=3600)
    _, fresh = _job(db, enqueued_at=now, chunk_size=8)
    _, stale = _job(db, enqueued_at=now - timedelta(seconds=120), chunk_size=8)
    _, expired = _job(db, enqueued_at=now, chunk_size=8)
    _, live = _job(db, enqueued_at=now, chunk_size=8)
    _, dead = _job(db, enqueued_at=now, chunk_size=8)
    late_id, late = _job(db, deadline_at=now - timedelta(seconds=1), chunk_size=8)
    old_id, _ = _job(db, created_at=now - timedelta(hours=2), enqueued_at=now, chunk_size=8)
    with db() as s, s.begin():
        C.claim_chunk(s, expired[0], "w-live", 10, now=now - timedelta(seconds=60))
        C.claim_chunk(s, live[0], "w-live", 120, now=now)
        C.claim_chunk(s, dead[0], "w-dead", 120, now=now)
        heartbeat(s, WorkerIdentity("w-live", "tiny", "h", 1, "cpu"), now=now)
        heartbeat(s, WorkerIdentity("w-dead", "tiny", "h", 2, "cpu"), now=now - timedelta(seconds=100))
    with db() as s, s.begin():
        report = R.reconcile(s, settings, now)
    assert sorted(r.chunk_id for r in report.redeliver) == sorted([stale[0], expired[0], dead[0]])
    assert sorted(report.timed_out_jobs) == sorted([late_id, old_id])
    with db() as s, s.begin():
        assert s.get(Job, late_id).state == "failed" and "timed out" in s.get(Job, late_id).error
        # a re-sent queued chunk waits for the grace period again; a dead owner's chunk is sent until taken
        again = R.reconcile(s, settings, now + timedelta(seconds=1))
    assert sorted(r.chunk_id for r in again.redeliver) == sorted([expired[0], dead[0]])


def test_reconcile_closes_running_chunks_of_closed_jobs_whose_owner_is_gone(db):
    now = utcnow()
    settings = Settings(enqueue_grace_seconds=60, worker_alive_seconds=45)
    cancelled_id, cancelled = _job(db, enqueued_at=now, chunk_size=2)
    failed_id, failed = _job(db, enqueued_at=now, chunk_size=2)
    with db() as s, s.begin():
        heartbeat(s, WorkerIdentity("w-live", "tiny", "h", 1, "cpu"), now=now)
        for ids in (cancelled, failed):
            C.claim_chunk(s, ids[0], "w-dead", 120, now=now)
            C.claim_chunk(s, ids[1], "w-live", 120, now=now)
        s.get(Job, cancelled_id).state = "cancelled"
        s.get(Job, failed_id).state = "failed"
    with db() as s, s.begin():
        report = R.reconcile(s, settings, now)
    assert report.closed_chunks == 2 and report.redeliver == []
    with db() as s:
        states = {cid: s.get(Chunk, cid).state for cid in cancelled[:2] + failed[:2]}
    # the live owner's chunks stay its own to close when it writes (write_results closes them)
    assert states == {cancelled[0]: "cancelled", cancelled[1]: "running", failed[0]: "failed", failed[1]: "running"}


def test_with_db_retry_retries_transient_errors_only():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OperationalError("select 1", {}, Exception("server closed the connection"))
        return "ok"

    assert C.with_db_retry(flaky, 10, first_delay=0.01, sleep=lambda _: None) == "ok" and len(calls) == 3
    with pytest.raises(ValueError):
        C.with_db_retry(lambda: (_ for _ in ()).throw(ValueError("bug")), 10, sleep=lambda _: None)
    with pytest.raises(OperationalError):
        C.with_db_retry(lambda: (_ for _ in ()).throw(OperationalError("x", {}, Exception("down"))), 0.05,
                        first_delay=0.01, sleep=lambda _: None)


def test_with_db_retry_never_sleeps_past_its_deadline(monkeypatch, caplog):
    monkeypatch.setattr("selfie_jobs.retry.random.random", lambda: 0.999)  # the longest jitter
    slept = []

    def sleep(seconds):
        slept.append(seconds)
        time.sleep(seconds)

    def down():
        raise OperationalError("select 1", {}, Exception("server closed the connection"))

    with caplog.at_level("WARNING", logger="selfie_jobs.retry"), pytest.raises(OperationalError):
        C.with_db_retry(down, 0.5, first_delay=0.05, sleep=sleep)
    # pauses grow (0.075, 0.15, then 0.3 would end past the deadline: raised instead of sleeping)
    assert len(slept) == 2 and slept[1] > slept[0] and sum(slept) <= 0.5, slept
    assert caplog.text.count("database unavailable") == len(slept)  # one warning per retry


def test_unit_of_work_commits_rolls_back_and_retries_with_a_new_session(db, caplog):
    job_id, _ = _job(db)
    sessions = []

    def fail_then_cancel(session):
        sessions.append(session)
        session.get(Job, job_id).state = "cancelled"
        if len(sessions) == 1:  # the first attempt's change must not survive: it is rolled back
            session.flush()
            raise OperationalError("update jobs", {}, Exception("server closed the connection"))
        return "done"

    with caplog.at_level("WARNING", logger="selfie_jobs.retry"):
        assert C.unit_of_work(db, fail_then_cancel, 10) == "done"
    assert len(sessions) == 2 and sessions[0] is not sessions[1]
    assert "database unavailable (attempt 1)" in caplog.text
    with db() as s:
        assert s.get(Job, job_id).state == "cancelled"  # committed

    def bug(session):
        session.get(Job, job_id).state = "failed"
        raise ValueError("bug")

    with pytest.raises(ValueError):
        C.unit_of_work(db, bug, 10)  # not transient: raised at once, rolled back
    with db() as s:
        assert s.get(Job, job_id).state == "cancelled"


def test_reconcile_fails_a_job_whose_chunk_keeps_getting_lost(db):
    now = utcnow()
    settings = Settings(enqueue_grace_seconds=60, worker_alive_seconds=45, max_chunk_attempts=2)
    job_id, ids = _job(db, chunk_size=8)
    with db() as s, s.begin():
        C.claim_chunk(s, ids[0], "gone-1", 10, now=now - timedelta(seconds=300))
        C.claim_chunk(s, ids[0], "gone-2", 10, now=now - timedelta(seconds=200))
    with db() as s, s.begin():
        report = R.reconcile(s, settings, now)
    assert report.redeliver == [] and report.failed_jobs == [job_id]
    with db() as s:
        job = s.get(Job, job_id)
        assert job.state == "failed" and "lost 2 times" in job.error


def test_owner_liveness(db):
    import socket

    now = utcnow()
    with db() as s, s.begin():
        heartbeat(s, WorkerIdentity("fresh", "tiny", "elsewhere", 1, "cpu"), now=now)
        heartbeat(s, WorkerIdentity("stale", "tiny", "elsewhere", 1, "cpu"), now=now - timedelta(seconds=60))
        heartbeat(s, WorkerIdentity("killed", "tiny", socket.gethostname(), 999_999, "cpu"), now=now)
        heartbeat(s, WorkerIdentity("stopped", "tiny", "elsewhere", 1, "cpu"), state="stopped", now=now)
    with db() as s:
        alive = {n: liveness.owner_is_alive(s, n, 45, hostname=socket.gethostname(), now=now)
                 for n in ("fresh", "stale", "killed", "stopped", "unknown", None)}
    assert alive == {"fresh": True, "stale": False, "killed": False, "stopped": False, "unknown": False, None: False}


def test_writes_of_one_job_in_one_transaction_store_each_row_once_and_complete_the_job(db):
    job_id, ids = _job(db)
    with db() as s, s.begin():
        claimed = [C.claim_chunk(s, i, "w1", 60) for i in ids]
        run_id = C.start_engine_run(s, "w1", "tiny", claimed)
    first, second = _rows(claimed[0]), _rows(claimed[1])
    writes = [(ids[0], first[:3], False), (ids[0], first, True), (ids[1], second, True)]
    outcomes = C.complete_many(db, writes, "w1", engine_run_id=run_id, worker="w1", model="tiny")
    assert [(o.inserted, o.chunk_done, o.job_state) for o in outcomes] == [(3, False, "running"),
                                                                           (1, True, "running"),
                                                                           (4, True, "succeeded")]
    with db() as s:
        job = s.get(Job, job_id)
        assert (job.done, job.total, job.state) == (8, 8, "succeeded")
        assert s.scalar(select(func.count()).select_from(Interpretation)) == 8
        assert {s.get(Chunk, i).state for i in ids} == {"done"}


def test_writes_in_one_transaction_store_nothing_for_a_cancelled_job(db):
    job_id, ids = _job(db)
    with db() as s, s.begin():
        claimed = [C.claim_chunk(s, i, "w1", 60) for i in ids]
        s.get(Job, job_id).state = "cancelled"
    writes = [(ids[0], _rows(claimed[0]), True), (ids[1], _rows(claimed[1]), False)]
    outcomes = C.complete_many(db, writes, "w1", engine_run_id="r", worker="w1", model="tiny")
    assert [(o.inserted, o.skipped_reason) for o in outcomes] == [(0, "job is cancelled")] * 2
    with db() as s:
        assert s.scalar(select(func.count()).select_from(Interpretation)) == 0
        assert {s.get(Chunk, i).state for i in ids} == {"cancelled"}
