"""The reconciler against a real Redis (and SQLite/PostgreSQL): queued chunks whose messages wait in their queue
are a backlog, not lost messages; only what the queue lacks is re-sent."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
import redis
from sqlalchemy import select

from selfie_jobs.db import get_engine, get_sessionmaker
from selfie_jobs.models import Chunk, utcnow
from selfie_jobs.queue import message_counter, model_queue, send_chunk
from selfie_jobs.reconcile import reconcile
from selfie_jobs.settings import Settings
from tests.apisupport import flush_model_queue, message_chunk_ids, queued_messages
from tests.unit.jobs.factories import make_job
from workers.celery_app import create_celery_app
from workers.tasks import reconcile_once

BACKLOG = 24


@pytest.fixture
def db(migrated_database_url):
    yield get_sessionmaker(migrated_database_url)
    get_engine.cache_clear()


@pytest.fixture
def app(redis_url, tmp_path):
    app = create_celery_app(Settings(data_dir=tmp_path), broker_url=redis_url, register=False)
    yield app
    app.close()


@pytest.fixture
def model(redis_url):
    """A model name unique to this test (the local Redis may be shared), with a character a queue name replaces."""
    name = f"org/m{uuid.uuid4().hex[:8]}"
    yield name
    flush_model_queue(redis_url, name)


@pytest.fixture
def backlog(db, app, model):
    """BACKLOG queued chunks of two jobs, sent ten minutes ago (well past the grace period), their messages in
    Redis at two priorities."""
    sent_at = utcnow() - timedelta(minutes=10)
    ids = []
    with db() as s, s.begin():
        for n in range(2):
            job = make_job(s, model=model, priority=3 + 4 * n, items=[(0, 0, t) for t in range(BACKLOG // 2)],
                           chunk_size=1, enqueued_at=sent_at)
            ids += [(c.id, c.model, c.priority) for c in s.scalars(select(Chunk).where(Chunk.job_id == job.id))]
    for chunk_id, chunk_model, priority in ids:
        send_chunk(app, chunk_id, chunk_model, priority)
    return sorted(i for i, _, _ in ids)


def _pass(db, app, settings, now):
    with db() as s, s.begin(), message_counter(app) as waiting:
        return [r.chunk_id for r in reconcile(s, settings, now, waiting=waiting).redeliver]


def _send(app, db, chunk_ids):
    with db() as s:
        for chunk in s.scalars(select(Chunk).where(Chunk.id.in_(chunk_ids))):
            send_chunk(app, chunk.id, chunk.model, chunk.priority)


def test_the_counter_reads_every_priority_list_of_the_queue(redis_url, app, model, backlog):
    keys = [k.decode() for k in redis.Redis.from_url(redis_url).keys(model_queue(model) + "*")
            if not k.startswith(b"_kombu")]
    assert len(keys) == 2 and model_queue(model) + ":6" in keys  # job priority 3 -> Redis priority 6
    with message_counter(app) as waiting:
        assert waiting(model_queue(model)) == BACKLOG
        assert waiting(model_queue("no-such-model-" + uuid.uuid4().hex)) == 0


def test_a_backlog_waiting_in_redis_is_not_resent(db, app, redis_url, model, backlog, tmp_path):
    settings = Settings(data_dir=tmp_path, enqueue_grace_seconds=60)
    now = utcnow()
    for minute in range(5):  # pass after pass: nothing is lost, nothing is sent
        assert _pass(db, app, settings, now + timedelta(minutes=minute)) == []
    assert reconcile_once(settings, db, app)["resent"] == []  # the task's own path asks the broker too
    assert message_chunk_ids(queued_messages(redis_url, model)) == backlog  # one message each, no more


def test_lost_messages_are_resent_once_per_pass(db, app, redis_url, model, backlog, tmp_path):
    settings = Settings(data_dir=tmp_path, enqueue_grace_seconds=60)
    now = utcnow()
    client = redis.Redis.from_url(redis_url)
    # Redis comes back from a restart without its last writes: three messages are gone
    for _ in range(3):
        client.rpop(model_queue(model) + ":6")
    resent = _pass(db, app, settings, now)
    assert len(resent) == 3 and set(resent) <= set(backlog)
    _send(app, db, resent)
    assert len(message_chunk_ids(queued_messages(redis_url, model))) == BACKLOG
    assert _pass(db, app, settings, now + timedelta(minutes=5)) == []

    # the queue is emptied (Redis flushed): every chunk is re-sent, each once per pass, pass after pass while the
    # messages keep getting lost, and nothing more once they stay
    for minute in (10, 12, 14):
        flush_model_queue(redis_url, model)
        resent = _pass(db, app, settings, now + timedelta(minutes=minute))
        assert sorted(resent) == backlog
        _send(app, db, resent)
    assert _pass(db, app, settings, now + timedelta(minutes=16)) == []
    assert message_chunk_ids(queued_messages(redis_url, model)) == backlog

    # the task's own path: flushed again, a real reconcile re-sends each chunk once
    flush_model_queue(redis_url, model)
    with db() as s, s.begin():
        for chunk in s.scalars(select(Chunk).where(Chunk.id.in_(backlog))):
            chunk.enqueued_at = now - timedelta(minutes=10)
    assert sorted(reconcile_once(settings, db, app)["resent"]) == backlog
    assert message_chunk_ids(queued_messages(redis_url, model)) == backlog


def test_a_chunk_whose_publish_failed_is_sent_whatever_its_queue_holds(db, app, model, backlog, tmp_path):
    # the api stamps enqueued_at only after publishing: a chunk without it was never sent, however many messages
    # its queue holds for the others
    settings = Settings(data_dir=tmp_path, enqueue_grace_seconds=60)
    with db() as s, s.begin():
        job = make_job(s, model=model, chunk_size=8, created_at=utcnow() - timedelta(minutes=10))
        (never_sent,) = s.scalars(select(Chunk.id).where(Chunk.job_id == job.id))
    assert _pass(db, app, settings, utcnow()) == [never_sent]


def test_a_pass_without_the_broker_still_does_what_needs_only_the_database(db, tmp_path):
    """Redis is unreachable: overdue jobs still fail and nothing waits for the broker's counts."""
    from selfie_jobs.models import Job

    dead_broker = create_celery_app(Settings(data_dir=tmp_path), broker_url="redis://127.0.0.1:1/0", register=False)
    with db() as s, s.begin():
        late = make_job(s, chunk_size=8, enqueued_at=utcnow(), deadline_at=utcnow() - timedelta(seconds=1))
        late_id = late.id
    try:
        out = reconcile_once(Settings(data_dir=tmp_path), db, dead_broker)
    finally:
        dead_broker.close()
    assert out["timed_out_jobs"] == [late_id] and out["resent"] == []
    with db() as s:
        assert s.get(Job, late_id).state == "failed"


def test_a_workers_send_to_a_frozen_broker_fails_instead_of_hanging(tmp_path):
    """A Redis that holds its connections open but no longer answers (stopped): a worker's send (the reconciler's,
    an audit's) raises within its bound, so the pass ends and the next one tries again."""
    import os
    import signal
    import time
    from concurrent.futures import ThreadPoolExecutor

    from kombu.exceptions import OperationalError

    from workers.embedded import start_embedded_redis

    with start_embedded_redis(tmp_path) as broker, ThreadPoolExecutor(1) as pool:
        app = create_celery_app(Settings(data_dir=tmp_path), broker_url=broker.url, register=False)
        try:
            send_chunk(app, 1, "frozen", 5)  # the pooled connection is open
            os.kill(broker._server.pid, signal.SIGSTOP)
            try:
                started = time.monotonic()
                sending = pool.submit(send_chunk, app, 2, "frozen", 5)
                with pytest.raises(OperationalError):
                    sending.result(timeout=60)  # a send without a bound waits here until the broker resumes
                took = time.monotonic() - started
            finally:
                os.kill(broker._server.pid, signal.SIGCONT)
        finally:
            app.close()
    assert took < 30, took
