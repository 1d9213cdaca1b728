"""A submit whose job is committed is never reported as failed, and overload answers 503, never 500.

The enqueue step runs after the commit: the job is stored and will run. A database error there (the step stamps
`enqueued_at` on the chunks it sent) once answered 500, so a client was told that a stored, running job failed.
Here that step meets a real database fault; the answer is 202 with the job, and the reconciler sends the chunks
whose stamp was lost.
"""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from sqlalchemy import select, text

import selfie_jobs.db as db
from api.broker import make_producer
from selfie_jobs.db import get_engine, get_sessionmaker, session_scope
from selfie_jobs.models import Chunk, Job, ServedModel
from tests.apisupport import flush_model_queue, live_server, message_chunk_ids, prepare_database, queued_messages, \
    settings_for


class FaultAfterSend:
    """The API's real producer, which, once the job's messages are out, has the database refuse the next write of
    the API process for a while: `hold()` starts the fault, `release()` ends it."""

    def __init__(self, producer, hold, release) -> None:
        self.producer, self.hold, self.release = producer, hold, release
        self.sent = 0

    def send_task(self, name, args=None, **options):
        result = self.producer.send_task(name, args=args, **options)
        self.sent += 1
        if self.sent == 1:
            self.hold()
        return result


def _postgres_table_lock(database_url: str):
    """Another connection takes an exclusive lock on `chunks`: the stamp's UPDATE waits for it until the API's
    `lock_timeout` (set on its URL) fails it with a real database error."""
    engine = get_engine(database_url)
    holder = {}

    def hold():
        conn = engine.connect()
        conn.execute(text("LOCK TABLE chunks IN EXCLUSIVE MODE"))
        holder["conn"] = conn

    def release():
        holder.pop("conn").close()  # rolls back: the lock goes

    return hold, release


def _sqlite_write_gate(database_url: str):
    """Another thread of the API process writes and keeps its transaction open: the stamp waits for the write
    gate until the gate's bounded wait gives up (DatabaseBusy)."""
    done = threading.Event()
    started = threading.Event()

    def writer():
        with get_sessionmaker(database_url)() as session:
            session.execute(select(ServedModel.name)).all()
            session.execute(text("UPDATE served_models SET name = name"))
            started.set()
            done.wait(30)
            session.rollback()

    def hold():
        threading.Thread(target=writer, daemon=True).start()
        assert started.wait(10)

    return hold, done.set


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_error_after_commit_still_answers_202_and_the_reconciler_sends_the_chunks(kind, request, redis_url,
                                                                                    monkeypatch):
    from workers.tasks import reconcile_once

    database_url = request.getfixturevalue(f"{kind}_url")
    model = "tiny-" + uuid.uuid4().hex[:8]
    prepare_database(database_url, model=model)
    if kind == "postgres":
        api_url = database_url + ("&" if "?" in database_url else "?") + "options=-c%20lock_timeout%3D500"
        hold, release = _postgres_table_lock(database_url)
    else:
        get_engine.cache_clear()
        monkeypatch.setattr(db, "SQLITE_WRITE_WAIT_SECONDS", 0.5)  # the gate's wait, shortened for the test
        api_url = database_url
        hold, release = _sqlite_write_gate(database_url)
    settings = settings_for(api_url, redis_url, enqueue_grace_seconds=1)
    producer = make_producer(redis_url)
    sender = FaultAfterSend(producer, hold, release)
    try:
        with live_server(settings, task_sender=sender) as srv, srv.client() as http:
            resp = http.post("/v1/jobs", json={"model": model, "prompts": ["The Eiffel Tower is in Paris"],
                                               "targets": {"layers": [0, 1, 2], "tokens": [0, 1, 2]}})
            release()
            assert resp.status_code == 202, resp.text
            job = resp.json()
            assert job["enqueued"] == job["chunks"] > 1  # every message went out; only their stamp was lost
            assert http.get(f"/v1/jobs/{job['id']}").json()["state"] == "queued"
        with session_scope(database_url) as s:
            assert s.get(Job, job["id"]) is not None
            chunk_ids = s.scalars(select(Chunk.id).where(Chunk.job_id == job["id"])).all()
            assert s.scalars(select(Chunk.enqueued_at).where(Chunk.job_id == job["id"])).all() == \
                [None] * len(chunk_ids)
        assert sorted(message_chunk_ids(queued_messages(redis_url, model))) == sorted(chunk_ids)

        # the reconciler sees the chunks as never sent and sends them again once the grace period is over
        time.sleep(1.2)
        report = reconcile_once(settings, get_sessionmaker(database_url), producer)
        assert sorted(report["resent"]) == sorted(chunk_ids)
        assert sorted(message_chunk_ids(queued_messages(redis_url, model))) == sorted(chunk_ids * 2)
        with session_scope(database_url) as s:
            assert None not in s.scalars(select(Chunk.enqueued_at).where(Chunk.job_id == job["id"])).all()
    finally:
        producer.close()
        flush_model_queue(redis_url, model)
        get_engine.cache_clear()


def test_no_turn_to_write_in_time_answers_503_and_stores_nothing(sqlite_url, redis_url, monkeypatch):
    """Another writer of the process holds the SQLite write gate past its bounded wait: the submit is refused with
    503 + Retry-After (DatabaseBusy), never 500, and nothing is stored or enqueued."""
    model = "tiny-" + uuid.uuid4().hex[:8]
    prepare_database(sqlite_url, model=model)
    get_engine.cache_clear()
    monkeypatch.setattr(db, "SQLITE_WRITE_WAIT_SECONDS", 0.5)  # the gate's wait, shortened for the test
    hold, release = _sqlite_write_gate(sqlite_url)
    try:
        with live_server(settings_for(sqlite_url, redis_url)) as srv, srv.client() as http:
            hold()
            resp = http.post("/v1/jobs", json={"model": model, "prompts": ["The Eiffel Tower is in Paris"]})
            release()
            assert resp.status_code == 503 and int(resp.headers["retry-after"]) > 0, resp.text
            ok = http.post("/v1/jobs", json={"model": model, "prompts": ["Paris"]})
            assert ok.status_code == 202
        with session_scope(sqlite_url) as s:
            assert len(s.scalars(select(Job.id)).all()) == 1
        assert len(queued_messages(redis_url, model)) == ok.json()["chunks"]
    finally:
        release()
        flush_model_queue(redis_url, model)
        get_engine.cache_clear()


class BlockingSender:
    """The API's real producer, holding the first submit inside its send until `go` is set (a slow broker)."""

    def __init__(self, producer):
        self.producer = producer
        self.inside = threading.Event()
        self.go = threading.Event()

    def send_task(self, name, args=None, **options):
        if not self.inside.is_set():
            self.inside.set()
            assert self.go.wait(30)
        return self.producer.send_task(name, args=args, **options)


def test_a_full_api_answers_503_with_retry_after_and_liveness_still_answers(sqlite_url, redis_url):
    """Over real HTTP, one slot and half a second in line: while a submit holds the slot, another request gets 503
    + Retry-After (not a wait without end, not 500), /healthz answers, and the held submit then completes."""
    model = "tiny-" + uuid.uuid4().hex[:8]
    prepare_database(sqlite_url, model=model)
    producer = make_producer(redis_url)
    sender = BlockingSender(producer)
    settings = settings_for(sqlite_url, redis_url, max_concurrent_requests=1, queue_wait_seconds=0.5)
    answers = {}
    try:
        with live_server(settings, task_sender=sender) as srv, srv.client() as http:
            first = threading.Thread(target=lambda: answers.setdefault("first", http.post(
                "/v1/jobs", json={"model": model, "prompts": ["The Eiffel Tower is in Paris"]})))
            first.start()
            assert sender.inside.wait(20)
            with srv.client() as other:
                refused = other.get("/v1/jobs")
                assert refused.status_code == 503 and int(refused.headers["retry-after"]) > 0, refused.text
                assert other.get("/healthz").status_code == 200
            sender.go.set()
            first.join(30)
            assert answers["first"].status_code == 202
            assert http.get("/v1/jobs").status_code == 200
    finally:
        sender.go.set()
        producer.close()
        flush_model_queue(redis_url, model)
        get_engine.cache_clear()
