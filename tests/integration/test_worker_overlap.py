"""Database work off the engine's path (`workers.overlap`): a task's runs back to back, the next run claimed while
the current one computes, and a run's last writes completing after its task returned. A real worker `Runtime`,
real SQLite/PostgreSQL, the batcher's fake runner (no model: nothing here depends on what the engine computes)."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from selfie_jobs import cards
from selfie_jobs.db import get_engine, get_sessionmaker
from selfie_jobs.models import Chunk, EngineRun, Interpretation, Job
from selfie_jobs.settings import Settings
from tests.unit.jobs.factories import make_job
from tests.unit.workers.test_batcher import FakeRunner
from workers import tasks
from workers.runtime import Runtime, WorkerOptions
from workers.sink import DbSink

CHUNK = 8  # items per chunk, and per engine run (max_batch_interpretations): one chunk a run


@pytest.fixture
def db(migrated_database_url):
    yield get_sessionmaker(migrated_database_url)
    get_engine.cache_clear()


def worker(db, tmp_path, runner: FakeRunner | None = None) -> Runtime:
    settings = Settings(data_dir=tmp_path, max_chunk_attempts=3, max_batch_interpretations=CHUNK)
    runtime = Runtime(settings=settings, options=WorkerOptions(model="tiny", node_name="w@h"), sessions=db,
                      identity=cards.worker_identity("w@h", "tiny", "cpu"))
    runtime.runners = {"interpret": runner or FakeRunner(batch=4)}
    with db() as s, s.begin():
        cards.heartbeat(s, runtime.identity)
    return runtime


def job_of(db, chunks: int, *, batch_key: str = "bk1", priority: int = 5) -> tuple[str, list[int]]:
    items = [(0, n // 4, n % 4) for n in range(chunks * CHUNK)]
    with db() as s, s.begin():
        job = make_job(s, items=items, chunk_size=CHUNK, batch_key=batch_key, priority=priority)
        return job.id, list(s.scalars(select(Chunk.id).where(Chunk.job_id == job.id).order_by(Chunk.index)))


def states(db, job_id: str) -> list[str]:
    with db() as s:
        return list(s.scalars(select(Chunk.state).where(Chunk.job_id == job_id).order_by(Chunk.index)))


def test_a_task_runs_the_queued_chunks_of_its_batch_key_back_to_back(db, tmp_path):
    runtime = worker(db, tmp_path)
    job_id, ids = job_of(db, 4)
    summary = tasks.run_chunk(runtime, ids[0], wait=False)
    runtime.overlap.drain()
    assert summary["completing"] is True and len(summary["continued"]) == 3  # four runs of one chunk each
    assert states(db, job_id) == ["done"] * 4
    with db() as s:
        job = s.get(Job, job_id)
        assert (job.state, job.done) == ("succeeded", 4 * CHUNK)
        assert s.scalar(select(func.count()).select_from(Interpretation).where(Interpretation.job_id == job_id)) \
            == 4 * CHUNK
        runs = s.scalars(select(EngineRun).where(EngineRun.worker == runtime.name)).all()
        assert len(runs) == 4 and all(r.elapsed_s is not None for r in runs)  # each recorded when it completed
    assert runtime.held() == []
    for chunk_id in ids[1:]:  # their own messages come later: answered without a claim
        assert tasks.run_chunk(runtime, chunk_id, wait=False) == {"chunk_id": chunk_id, "skipped": "chunk is done"}


def test_a_more_urgent_batch_key_at_the_head_of_the_queue_ends_the_task(db, tmp_path):
    runtime = worker(db, tmp_path)
    job_id, ids = job_of(db, 3)
    urgent_id, _ = job_of(db, 2, batch_key="bk2", priority=9)
    summary = tasks.run_chunk(runtime, ids[0], wait=False)
    runtime.overlap.drain()
    assert "continued" not in summary
    assert states(db, job_id) == ["done", "queued", "queued"]  # left to the queue, which gives out the urgent first
    assert states(db, urgent_id) == ["queued", "queued"]


def test_a_worker_that_is_shutting_down_takes_no_run_ahead(db, tmp_path):
    runtime = worker(db, tmp_path)
    runtime.shutting_down = lambda: True
    job_id, ids = job_of(db, 3)
    summary = tasks.run_chunk(runtime, ids[0], wait=False)
    runtime.overlap.drain()
    assert "continued" not in summary and states(db, job_id) == ["done", "queued", "queued"]


def test_chunks_claimed_ahead_go_back_to_the_queue_when_the_run_fails(db, tmp_path):
    runtime = worker(db, tmp_path, FakeRunner(crash=RuntimeError("the engine broke")))
    job_id, ids = job_of(db, 3)
    with pytest.raises(RuntimeError, match="the engine broke"):
        tasks.run_chunk(runtime, ids[0], wait=False)
    with db() as s:
        chunks = s.scalars(select(Chunk).where(Chunk.job_id == job_id).order_by(Chunk.index)).all()
        # the failed run's chunk and the one claimed ahead for the next run are both handed back, the second with
        # its attempt given back (it never ran); the third was never claimed
        assert [(c.state, c.attempts, c.owner) for c in chunks] == [("queued", 1, None), ("queued", 0, None),
                                                                    ("queued", 0, None)]
    assert runtime.held() == []


def test_a_healthy_job_behind_a_failing_one_never_fails_for_runs_it_did_not_start(db, tmp_path):
    # Every redelivery of the failing job's chunk claims the healthy job's chunk ahead (it heads the queue next) and
    # gives it back when the run fails: that must not spend the healthy chunk's attempts.
    runtime = worker(db, tmp_path, FakeRunner(crash=RuntimeError("the engine broke")))
    failing_id, (failing,) = job_of(db, 1)
    healthy_id, _ = job_of(db, 2)
    for _ in range(runtime.settings.max_chunk_attempts + 1):
        try:
            tasks.run_chunk(runtime, failing, wait=False)
        except RuntimeError:
            pass
    with db() as s:
        assert s.get(Job, failing_id).state == "failed"
        assert s.get(Job, healthy_id).state == "queued"
    assert states(db, healthy_id) == ["queued", "queued"]
    runtime.runners["interpret"] = FakeRunner(batch=4)
    first = _chunk_ids(db, healthy_id)[0]
    tasks.run_chunk(runtime, first, wait=False)
    runtime.overlap.drain()
    with db() as s:
        assert s.get(Job, healthy_id).state == "succeeded"


def _chunk_ids(db, job_id: str) -> list[int]:
    with db() as s:
        return list(s.scalars(select(Chunk.id).where(Chunk.job_id == job_id).order_by(Chunk.index)))


def test_a_write_that_fails_after_the_task_returned_hands_the_run_back(db, tmp_path, monkeypatch):
    class CompletionsFail(DbSink):
        def write(self, chunk_id, rows, complete):
            if complete:
                raise RuntimeError("database gone for good")
            return super().write(chunk_id, rows, complete)

        def write_many(self, writes):
            return [self.write(*w) for w in writes]

    monkeypatch.setattr(tasks, "DbSink", CompletionsFail)
    runtime = worker(db, tmp_path)
    job_id, ids = job_of(db, 1)
    summary = tasks.run_chunk(runtime, ids[0], wait=False)
    assert summary["completing"] is True  # the task returned; the run's completion fails afterwards
    runtime.overlap.drain()
    with db() as s:
        (chunk,) = s.scalars(select(Chunk).where(Chunk.job_id == job_id)).all()
        assert (chunk.state, chunk.owner) == ("queued", None)  # back in the queue, for its attempt 2
        assert "database gone for good" in (chunk.error or "")
    assert runtime.held() == []


def test_a_more_urgent_job_submitted_during_a_run_does_not_wait_for_the_run_claimed_ahead(db, tmp_path):
    urgent: list[str] = []

    class SubmitsDuringTheRun(FakeRunner):
        def stream(self, items, spec):
            if not urgent:  # while the first run computes (its next run may be claimed ahead already)
                urgent.append(job_of(db, 1, batch_key="bk2", priority=9)[0])
            return super().stream(items, spec)

    runtime = worker(db, tmp_path, SubmitsDuringTheRun(batch=4))
    job_id, ids = job_of(db, 3)
    summary = tasks.run_chunk(runtime, ids[0], wait=False)
    runtime.overlap.drain()
    assert "continued" not in summary
    with db() as s:
        chunks = s.scalars(select(Chunk).where(Chunk.job_id == job_id).order_by(Chunk.index)).all()
        assert [(c.state, c.attempts) for c in chunks] == [("done", 1), ("queued", 0), ("queued", 0)]
    assert states(db, urgent[0]) == ["queued"]  # the queue gives it out next
    assert runtime.held() == []
