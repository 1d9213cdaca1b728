"""A submit while the model's worker is still loading: queued (the status says why it waits) when the model has a
card, 503 with Retry-After when it is the model's first load (no card yet), and a clear 422 when nobody serves or
loads it. Workers rows are written as the worker writes them (`cards.heartbeat` with the state it reports)."""

from __future__ import annotations

import pytest

from selfie_jobs.cards import LOADING_RETRY_AFTER_SECONDS, heartbeat, worker_identity
from selfie_jobs.db import get_engine, session_scope
from tests.apisupport import (
    MODEL,
    flush_model_queue,
    live_server,
    message_chunk_ids,
    prepare_database,
    queued_messages,
    settings_for,
)

pytestmark = pytest.mark.timeout(120)
FRESH = "fresh"  # a model whose worker loads it for the first time: no card yet


@pytest.fixture
def server(sqlite_url, redis_url):
    prepare_database(sqlite_url)  # the card of MODEL, as a worker that loaded it once wrote it
    for model in (MODEL, FRESH):
        flush_model_queue(redis_url, model)
    try:
        with live_server(settings_for(sqlite_url, redis_url, worker_alive_seconds=30)) as srv:
            srv.database_url, srv.redis_url = sqlite_url, redis_url
            yield srv
    finally:
        get_engine.cache_clear()


def worker_says(database_url: str, model: str, state: str, identity=None):
    identity = identity or worker_identity("loader@testhost", model, "cpu")
    with session_scope(database_url) as session:
        heartbeat(session, identity, state=state, info={"device": "cpu", "threads": 1})
    return identity


def job_body(model: str) -> dict:
    return {"model": model, "prompts": ["a cat sat"], "targets": {"layers": [0], "tokens": [-1]},
            "max_new_tokens": 2}


def job_chunk_ids(database_url: str, job_id: str) -> set[int]:
    from sqlalchemy import select

    from selfie_jobs.models import Chunk

    with session_scope(database_url) as session:
        ids = set(session.scalars(select(Chunk.id).where(Chunk.job_id == job_id)))
    assert ids
    return ids


def stored_jobs(database_url: str) -> int:
    from sqlalchemy import func, select

    from selfie_jobs.models import Job

    with session_scope(database_url) as session:
        return int(session.scalar(select(func.count()).select_from(Job)))


def test_a_model_with_a_card_is_queued_while_its_worker_loads_and_the_status_says_so(server):
    http = server.client()
    identity = worker_says(server.database_url, MODEL, "loading")
    res = http.post("/v1/jobs", json=job_body(MODEL))
    assert res.status_code == 202, res.text
    job_id = res.json()["id"]
    status = http.get(f"/v1/jobs/{job_id}").json()
    assert status["state"] == "queued"
    assert status["waiting"] == f"waiting for model {MODEL!r} to load on worker {identity.name}"
    assert job_chunk_ids(server.database_url, job_id) <= set(message_chunk_ids(queued_messages(server.redis_url)))

    worker_says(server.database_url, MODEL, "ready", identity)
    assert http.get(f"/v1/jobs/{job_id}").json()["waiting"] is None  # a worker is ready: just queued
    worker_says(server.database_url, MODEL, "load_failed", identity)
    assert "failed to load" in http.get(f"/v1/jobs/{job_id}").json()["waiting"]


def test_a_job_of_a_model_nobody_serves_says_so(server):
    http = server.client()
    res = http.post("/v1/jobs", json=job_body(MODEL))
    assert res.status_code == 202, res.text
    waiting = http.get(f"/v1/jobs/{res.json()['id']}").json()["waiting"]
    assert waiting == f"no live worker serves model {MODEL!r}; start one (`selfie worker --model {MODEL}`)"


def test_a_first_load_answers_503_with_retry_after_and_stores_nothing(server):
    http = server.client()
    identity = worker_says(server.database_url, FRESH, "loading")
    res = http.post("/v1/jobs", json=job_body(FRESH))
    assert res.status_code == 503, res.text
    assert res.headers["retry-after"] == str(LOADING_RETRY_AFTER_SECONDS)
    assert res.json()["field"] == "model"
    assert f"model {FRESH!r} is still loading on worker {identity.name}" in res.json()["detail"]
    assert stored_jobs(server.database_url) == 0 and queued_messages(server.redis_url, FRESH) == []

    worker_says(server.database_url, FRESH, "load_failed", identity)  # it gave up: waiting no longer helps
    refused = http.post("/v1/jobs", json=job_body(FRESH))
    assert refused.status_code == 422 and "unknown model 'fresh'" in refused.json()["detail"]


def test_a_model_nobody_serves_or_loads_is_a_clear_422(server):
    res = server.client().post("/v1/jobs", json=job_body("nobody"))
    assert res.status_code == 422
    assert res.json() == {"detail": f"unknown model 'nobody'; served models: {MODEL}", "field": "model"}
