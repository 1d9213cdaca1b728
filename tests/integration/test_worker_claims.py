"""What a worker does with the message it receives, before any engine work: `workers.tasks.run_chunk`'s claim,
with a real worker `Runtime` (no model is needed before the claim), real SQLite/PostgreSQL and real Redis."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import select

from selfie_jobs import cards
from selfie_jobs.db import get_engine, get_sessionmaker
from selfie_jobs.models import Chunk
from selfie_jobs.queue import model_queue
from selfie_jobs.settings import Settings
from tests.apisupport import flush_model_queue, message_chunk_ids, queued_messages
from tests.unit.jobs.factories import make_job
from workers import claims, tasks
from workers.celery_app import create_celery_app
from workers.runtime import Runtime, WorkerOptions


@pytest.fixture
def db(migrated_database_url):
    yield get_sessionmaker(migrated_database_url)
    get_engine.cache_clear()


@pytest.fixture
def models(redis_url):
    """Two model names unique to this test (the local Redis may be shared). ``org/m`` and ``org_m`` once shared a
    queue; their messages can still reach the other's worker (sent before the queue names told them apart)."""
    tag = uuid.uuid4().hex[:8]
    ours, theirs = f"org/m{tag}", f"org_m{tag}"
    assert model_queue(ours) != model_queue(theirs)
    yield ours, theirs
    flush_model_queue(redis_url, theirs)


@pytest.fixture
def sender(redis_url, tmp_path):
    app = create_celery_app(Settings(data_dir=tmp_path), broker_url=redis_url, register=False)
    yield app
    app.close()


def runtime_for(db, tmp_path, model: str, node: str = "w@h") -> Runtime:
    """A worker's runtime as `start()` leaves it, without loading a model (nothing here reaches the engine)."""
    settings = Settings(data_dir=tmp_path, max_chunk_attempts=2)
    return Runtime(settings=settings, options=WorkerOptions(model=model, node_name=node), sessions=db,
                   identity=cards.worker_identity(node, model, "cpu"))


def chunks_of(db, model: str) -> list[int]:
    with db() as s, s.begin():
        job = make_job(s, model=model, chunk_size=8)
        return list(s.scalars(select(Chunk.id).where(Chunk.job_id == job.id)))


def test_a_message_for_another_models_chunk_uses_no_attempt_and_is_sent_on(db, tmp_path, redis_url, models, sender):
    ours, theirs = models
    worker = runtime_for(db, tmp_path, ours)
    (chunk_id,) = chunks_of(db, theirs)

    def row():
        with db() as s:
            chunk = s.get(Chunk, chunk_id)
            return chunk.state, chunk.attempts, chunk.owner

    # nobody serves the chunk's model: it waits, queued and untouched, for the reconciler
    out = tasks.run_chunk(worker, chunk_id, sender=sender)
    assert row() == ("queued", 0, None)
    assert "no live worker serves it" in out["skipped"]
    assert queued_messages(redis_url, theirs) == []

    # now one does: the message is sent on to that model's queue, again and again if need be, and never uses up
    # an attempt (max_chunk_attempts is 2: the old claim-then-release failed the job on the third message)
    other = runtime_for(db, tmp_path, theirs, node="other@h")
    with db() as s, s.begin():
        cards.heartbeat(s, other.identity)
    for _ in range(3):
        out = tasks.run_chunk(worker, chunk_id, sender=sender)
        assert out["skipped"] == f"chunk is for model {theirs}, this worker serves {ours} (sent on)"
    assert message_chunk_ids(queued_messages(redis_url, theirs)) == [chunk_id] * 3
    assert row() == ("queued", 0, None)

    # the chunk's own model claims it as its first attempt
    claim = claims.claim(other, chunk_id)
    assert [c.id for c in claim.chunks] == [chunk_id] and claim.chunks[0].attempts == 1


def test_a_worker_restarted_with_its_old_pid_takes_over_its_predecessors_chunk_at_once(db, tmp_path):
    (chunk_id,) = chunks_of(db, "tiny")
    before = runtime_for(db, tmp_path, "tiny")
    with db() as s, s.begin():
        cards.heartbeat(s, before.identity)
    assert [c.id for c in claims.claim(before, chunk_id).chunks] == [chunk_id]
    # it dies holding the chunk, and its container restarts: same node name, same hostname, same pid, and its
    # predecessor's heartbeat still fresh; the chunk's lease (120 s) has long to run
    after = runtime_for(db, tmp_path, "tiny")
    assert (after.identity.hostname, after.identity.pid) == (before.identity.hostname, before.identity.pid)
    assert after.name != before.name
    with db() as s, s.begin():  # what Runtime.start does before it serves anything
        assert cards.mark_dead_local_workers(s, after.identity.hostname, me=after.name) == [before.name]
        cards.heartbeat(s, after.identity)
    claim = claims.claim(after, chunk_id)  # the redelivered message
    assert [c.id for c in claim.chunks] == [chunk_id] and claim.chunks[0].attempts == 2, claim.why


def test_a_chunk_an_earlier_task_of_this_worker_left_behind_is_taken_over(db, tmp_path):
    (chunk_id,) = chunks_of(db, "tiny")
    worker = runtime_for(db, tmp_path, "tiny")
    with db() as s, s.begin():
        cards.heartbeat(s, worker.identity)
    assert claims.claim(worker, chunk_id).chunks  # the task ends without handing the chunk back
    claim = claims.claim(worker, chunk_id)  # its redelivered message
    assert [c.id for c in claim.chunks] == [chunk_id] and claim.chunks[0].attempts == 2, claim.why
    worker.hold([chunk_id])  # while this runtime does run it, a duplicate message leaves it alone
    assert claims.claim(worker, chunk_id).why == "chunk is already being run by this worker"


def test_the_message_of_a_chunk_this_worker_finished_as_a_companion_is_answered_without_the_database(db, tmp_path,
                                                                                                    models):
    ours, _ = models
    worker = runtime_for(db, tmp_path, ours)
    (chunk_id, *_) = chunks_of(db, ours)
    with db() as s, s.begin():
        s.get(Chunk, chunk_id).state = "done"  # as the run that took it as a companion left it
    worker.finished([chunk_id])

    def no_database():
        raise AssertionError("a finished chunk's message opened a session")

    worker.sessions = no_database
    assert tasks.run_chunk(worker, chunk_id) == {"chunk_id": chunk_id, "skipped": "chunk is done"}
