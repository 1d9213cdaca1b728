"""The HTTP API over real HTTP (uvicorn), against SQLite and PostgreSQL, with real Redis as the broker."""

from __future__ import annotations

import csv
import io
import json
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from selfie_jobs.auth import create_key, revoke_key
from selfie_jobs.cards import WorkerIdentity, heartbeat
from selfie_jobs.db import session_scope
from selfie_jobs.models import Chunk, Interpretation, Job, Prompt, utcnow
from selfie_jobs.specs import MAX_TTL_SECONDS
from tests.apisupport import (
    NUM_LAYERS,
    flush_model_queue,
    live_server,
    message_chunk_ids,
    prepare_database,
    queued_messages,
    settings_for,
)


@pytest.fixture
def env(database_url, redis_url):
    """A migrated database with a model card under a name of its own (so queues of other tests never mix)."""
    model = "tiny-" + uuid.uuid4().hex[:8]
    prepare_database(database_url, model=model)
    yield database_url, redis_url, model
    flush_model_queue(redis_url, model)


@pytest.fixture
def server(env):
    database_url, redis_url, model = env
    with live_server(settings_for(database_url, redis_url)) as srv:
        srv.model = model
        yield srv


def body(model, **kw):
    kw.setdefault("prompts", ["The Eiffel Tower is located in Paris"])
    return {"model": model, **kw}


def count(url, entity) -> int:
    with session_scope(url) as s:
        return s.scalar(select(func.count()).select_from(entity))


def test_submit_stores_and_enqueues_json_messages(env, server):
    database_url, redis_url, model = env
    with server.client() as http:
        resp = http.post("/v1/jobs", json=body(model, prompts=["a cat sat", "the dog ran to the park"],
                                             targets={"layers": [0, 2, -1], "tokens": [0, -1]}, priority=7))
        assert resp.status_code == 202, resp.text
        accepted = resp.json()
        assert accepted["total"] == 12 and accepted["chunks"] == 2 and accepted["enqueued"] == 2
        assert resp.headers["location"] == accepted["link"] == f"{server.url}/v1/jobs/{accepted['id']}"
        page = http.get(accepted["links"]["page"])
        assert accepted["links"]["page"] == f"{server.url}/ui/jobs/{accepted['id']}" and page.status_code == 200

        status = http.get(f"/v1/jobs/{accepted['id']}").json()
        assert http.get(f"/v1/jobs/{accepted['id']}", params={"include_prompts": "false"}).json()["prompts"] == []
    assert status["state"] == "queued" and status["progress"] == {"done": 0, "total": 12, "fraction": 0.0, "in_flight": 0,
                                                                "decode_step": None, "decode_steps": None,
                                                                "rows_per_second": None, "eta_seconds": None}
    assert status["chunks"]["queued"] == 2 and status["queue_position"] == 0
    assert status["prompts"][0]["tokens"] == ["<s>", "a", "cat", "sat"]
    assert status["timings"]["created_at"].endswith(("Z", "+00:00"))

    with session_scope(database_url) as s:
        chunks = s.scalars(select(Chunk).where(Chunk.job_id == accepted["id"]).order_by(Chunk.index)).all()
        chunk_ids = [c.id for c in chunks]
        assert all(c.enqueued_at is not None and c.priority == 7 for c in chunks)
        assert chunks[0].items[0] == [0, 0, 0]
    messages = queued_messages(redis_url, model)
    assert message_chunk_ids(messages) == chunk_ids
    assert {m["properties"]["delivery_info"]["routing_key"] for m in messages} == {"selfie.model." + model}


BAD_BODIES = [
    ("unknown model", lambda m: body("no-such-model")),
    ("layer past the depth", lambda m: body(m, targets={"layers": [NUM_LAYERS + 1]})),
    ("token past the end", lambda m: body(m, targets={"tokens": [50]})),
    ("negative token past the start", lambda m: body(m, targets={"pairs": [[0, -50]]})),
    ("k past the depth", lambda m: body(m, k=NUM_LAYERS)),
    ("k negative", lambda m: body(m, k=-1)),
    ("empty prompt", lambda m: body(m, prompts=[""])),
    ("no prompts", lambda m: body(m, prompts=[])),
    ("over-long prompt", lambda m: body(m, prompts=["cat " * 200])),
    ("too many prompts", lambda m: body(m, prompts=["cat"] * 21)),
    ("unknown preset", lambda m: body(m, template="limerick")),
    ("template without placeholder", lambda m: body(m, template={"parts": ["just text"]})),
    ("temperature zero", lambda m: body(m, decoding={"temperature": 0})),
    ("top_p above one", lambda m: body(m, decoding={"top_p": 2})),
    ("max_new_tokens over cap", lambda m: body(m, max_new_tokens=1000)),
    ("priority out of range", lambda m: body(m, priority=12)),
    ("over the per-job cap", lambda m: body(m, prompts=["a cat sat on the mat"] * 20)),
    ("wrong type", lambda m: body(m, k="one")),
    ("unknown field", lambda m: body(m, colour="blue")),
    ("NUL in prompt", lambda m: body(m, prompts=["a\x00b"])),
    ("time to live zero", lambda m: body(m, ttl_seconds=0)),
    ("time to live negative", lambda m: body(m, ttl_seconds=-60)),
    ("time to live past ten years", lambda m: body(m, ttl_seconds=MAX_TTL_SECONDS + 1)),
    ("time to live as text", lambda m: body(m, ttl_seconds="3600")),
    ("time to live fractional", lambda m: body(m, ttl_seconds=1.5)),
]


@pytest.mark.parametrize("name, make", BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_bad_input_is_refused_with_nothing_stored_or_enqueued(env, server, name, make):
    database_url, redis_url, model = env
    with server.client() as http:
        resp = http.post("/v1/jobs", json=make(model))
    assert 400 <= resp.status_code < 500, (name, resp.status_code, resp.text)
    assert resp.json()["detail"]
    assert count(database_url, Job) == count(database_url, Chunk) == count(database_url, Prompt) == 0
    assert queued_messages(redis_url, model) == []


def test_a_time_to_live_is_stored_with_its_job_and_shown(env, server):
    database_url, _, model = env
    with server.client() as http:
        asked = http.post("/v1/jobs", json=body(model, ttl_seconds=MAX_TTL_SECONDS)).json()["id"]
        default = http.post("/v1/jobs", json=body(model)).json()["id"]
    from selfie_client import Client

    with Client(server.url) as client:
        by_client = client.submit("The Eiffel Tower is located in Paris", model=model, ttl_seconds=3600)["id"]
    with server.client() as http:
        shown = {j: http.get(f"/v1/jobs/{j}").json()["ttl_seconds"] for j in (asked, default, by_client)}
    with session_scope(database_url) as s:
        stored = {j: s.get(Job, j).ttl_seconds for j in (asked, default, by_client)}
    assert stored == shown == {asked: MAX_TTL_SECONDS, default: None, by_client: 3600}


def test_malformed_json_is_refused(env, server):
    database_url, redis_url, model = env
    with server.client() as http:
        resp = http.post("/v1/jobs", content=b'{"prompts": ["x"', headers={"content-type": "application/json"})
    assert resp.status_code == 422
    assert count(database_url, Job) == 0 and queued_messages(redis_url, model) == []


def test_oversized_body_is_refused(env, server):
    database_url, redis_url, model = env
    with server.client() as http:
        resp = http.post("/v1/jobs", content=b'{"prompts": ["' + b"a" * (1 << 21) + b'"]}',
                         headers={"content-type": "application/json"})
    assert resp.status_code == 413
    assert count(database_url, Job) == 0 and queued_messages(redis_url, model) == []


def test_oversized_chunked_body_is_refused(env, server):
    """No Content-Length to check up front: the body is counted as it streams in, and the 413 comes from there."""
    from api.limits import body_limit

    database_url, redis_url, model = env
    limit = body_limit(server.app.state.settings, "POST", "/v1/jobs")
    sent = 0

    def stream():
        nonlocal sent
        yield b'{"prompts": ["'
        for _ in range(limit // 65536 + 2):
            sent += 65536
            yield b"a" * 65536
        yield b'"]}'

    with server.client() as http:
        resp = http.post("/v1/jobs", content=stream(), headers={"content-type": "application/json"})
    assert sent > limit
    assert resp.status_code == 413, resp.text
    assert resp.json() == {"detail": f"request body larger than {limit} bytes"}
    assert count(database_url, Job) == 0 and queued_messages(redis_url, model) == []


def test_idempotency_key(env, server):
    database_url, redis_url, model = env
    with server.client() as http:
        first = http.post("/v1/jobs", json=body(model, idempotency_key="retry-me"))
        again = http.post("/v1/jobs", json=body(model, idempotency_key="retry-me"))
    assert first.status_code == 202 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"] and again.json()["created"] is False
    assert count(database_url, Job) == 1
    assert len(queued_messages(redis_url, model)) == first.json()["chunks"]


def test_idempotency_key_replayed_with_another_body_is_a_conflict(env, server):
    database_url, redis_url, model = env
    with server.client() as http:
        first = http.post("/v1/jobs", json=body(model, idempotency_key="once", max_new_tokens=5))
        other = http.post("/v1/jobs", json=body(model, idempotency_key="once", max_new_tokens=6))
        same = http.post("/v1/jobs", json=body(model, idempotency_key="once", max_new_tokens=5, priority=5))
    assert first.status_code == 202 and same.status_code == 200 and same.json()["id"] == first.json()["id"]
    assert other.status_code == 409, other.text
    detail = other.json()
    assert detail["field"] == "idempotency_key" and "different request" in detail["detail"]
    assert first.json()["id"] in detail["detail"]
    assert count(database_url, Job) == 1
    assert len(queued_messages(redis_url, model)) == first.json()["chunks"]


def test_cancel_cancels_job_and_queued_chunks(env, server):
    database_url, _, model = env
    with server.client() as http:
        job_id = http.post("/v1/jobs", json=body(model)).json()["id"]
        with session_scope(database_url) as s:  # a worker holds the first chunk
            first = s.scalars(select(Chunk).where(Chunk.job_id == job_id).order_by(Chunk.index)).first()
            first.state, first.owner = "running", "w1"
        resp = http.post(f"/v1/jobs/{job_id}/cancel")
        assert resp.status_code == 200 and resp.json() == {"id": job_id, "state": "cancelled", "cancelled": True}
        assert http.post(f"/v1/jobs/{job_id}/cancel").json()["cancelled"] is False
        status = http.get(f"/v1/jobs/{job_id}").json()
    assert status["state"] == "cancelled" and status["timings"]["finished_at"]
    assert status["chunks"]["running"] == 1 and status["chunks"]["queued"] == 0 and status["chunks"]["cancelled"] > 0
    assert status["queue_position"] is None


def _fill_results(url, job_id):
    """Rows as a worker writes them: every (prompt, layer, token) of the job (relevancy values that float32, the
    stored precision, holds exactly)."""
    with session_scope(url) as s:
        chunks = s.scalars(select(Chunk).where(Chunk.job_id == job_id)).all()
        n = 0
        for chunk in chunks:
            for p, layer, token in chunk.items:
                n += 1
                s.add(Interpretation(
                    job_id=job_id, prompt_index=p, layer=layer, token=token, source_token=f"t{token}",
                    text=f"about {'paris' if layer % 2 else 'a tower'} {n}", token_ids=[1, 2],
                    relevancy=[0.25, 0.5], mean_relevancy=round((n * 7 % 13) / 13, 4), chunk_id=chunk.id,
                    engine_run_id="r1", worker="w1", model=chunk.model, created_at=utcnow()))
            chunk.state = "done"
        job = s.get(Job, job_id)
        job.done, job.state, job.started_at, job.finished_at = n, "succeeded", utcnow(), utcnow()
    return n


def test_interpretations_filters_sort_pagination_and_csv(env, server):
    database_url, _, model = env
    with server.client() as http:
        job_id = http.post("/v1/jobs", json=body(model, prompts=["a cat sat", "the dog ran"])).json()["id"]
        total = _fill_results(database_url, job_id)
        assert total == 2 * (NUM_LAYERS + 1) * 4

        seen, cursor = [], None
        while True:
            page = http.get(f"/v1/jobs/{job_id}/interpretations",
                            params={"limit": 7, **({"cursor": cursor} if cursor else {})}).json()
            seen += [(r["prompt_index"], r["layer"], r["token"]) for r in page["items"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == sorted(seen) and len(seen) == len(set(seen)) == total

        by_rel, cursor = [], None
        while True:
            page = http.get(f"/v1/jobs/{job_id}/interpretations",
                            params={"sort": "-relevancy", "limit": 9, **({"cursor": cursor} if cursor else {})}).json()
            by_rel += [r["mean_relevancy"] for r in page["items"]]
            cursor = page["next_cursor"]
            if not cursor:
                break
        assert by_rel == sorted(by_rel, reverse=True) and len(by_rel) == total

        filtered = http.get(f"/v1/jobs/{job_id}/interpretations",
                            params={"prompt": 1, "layer_min": 1, "layer_max": 3, "token": 2, "min_relevancy": 0.2,
                                    "q": "PARIS"}).json()["items"]
        assert filtered and all(r["prompt_index"] == 1 and r["layer"] in (1, 3) and r["token"] == 2
                                and r["mean_relevancy"] >= 0.2 and "paris" in r["text"] for r in filtered)
        assert http.get(f"/v1/jobs/{job_id}/interpretations", params={"q": "100%_"}).json()["items"] == []

        as_csv = http.get(f"/v1/jobs/{job_id}/interpretations", params={"format": "csv"})
        assert as_csv.status_code == 200 and as_csv.headers["content-type"].startswith("text/csv")
        rows = list(csv.DictReader(io.StringIO(as_csv.text)))
        assert len(rows) == total and rows[0]["text"].startswith("about") and rows[0]["relevancy"] == "[0.25, 0.5]"
        accepted = http.get(f"/v1/jobs/{job_id}/interpretations", params={"prompt": 0, "limit": 5},
                            headers={"Accept": "text/csv"})
        assert accepted.headers["content-type"].startswith("text/csv")
        assert len(list(csv.DictReader(io.StringIO(accepted.text)))) == 5

        assert http.get(f"/v1/jobs/{job_id}/interpretations", params={"cursor": "bogus"}).status_code == 400
        first = http.get(f"/v1/jobs/{job_id}/interpretations", params={"limit": 1}).json()["next_cursor"]
        assert http.get(f"/v1/jobs/{job_id}/interpretations",
                        params={"cursor": first, "sort": "layer"}).status_code == 400
        status = http.get(f"/v1/jobs/{job_id}").json()
        assert status["state"] == "succeeded" and status["progress"]["fraction"] == 1.0


HOSTILE = ["=HYPERLINK(\"http://x\")", "+1+cmd", "-2+3", "@SUM(A1)", "\t=1", "\r=1", "plain", "-0.5"]


def test_csv_is_spreadsheet_safe_by_default_and_raw_on_request(env, server):
    """Cells a spreadsheet would run as formulas are prefixed with ' in the default CSV (the browser's download);
    `csv=raw` gives the exact text; the client is raw by default, the CLI safe unless --raw."""
    database_url, _, model = env
    with server.client() as http:
        job_id = http.post("/v1/jobs", json=body(model, targets={"pairs": [[0, 0]]}, prompts=["a"] * 8)).json()["id"]
        _fill_results(database_url, job_id)
        with session_scope(database_url) as s:
            rows = s.scalars(select(Interpretation).where(Interpretation.job_id == job_id)
                             .order_by(Interpretation.prompt_index)).all()
            for row, text in zip(rows, HOSTILE, strict=True):
                row.text, row.source_token = text, text
        safe = list(csv.DictReader(io.StringIO(http.get(f"/v1/jobs/{job_id}/interpretations",
                                                        params={"format": "csv"}).text)))
        raw = list(csv.DictReader(io.StringIO(http.get(f"/v1/jobs/{job_id}/interpretations",
                                                       params={"format": "csv", "csv": "raw"}).text)))
        assert http.get(f"/v1/jobs/{job_id}/interpretations", params={"format": "csv", "csv": "x"}).status_code == 422
    expected = ["'" + t if t[0] in "=+-@\t\r" and t != "-0.5" else t for t in HOSTILE]
    assert [r["text"] for r in safe] == [r["source_token"] for r in safe] == expected
    assert [r["text"] for r in raw] == HOSTILE
    from selfie_client import Client

    with Client(server.url) as client:
        assert [r["text"] for r in csv.DictReader(io.StringIO(client.results_csv(job_id)))] == HOSTILE
        assert [r["text"] for r in csv.DictReader(io.StringIO(client.results_csv(job_id, safe=True)))] == expected


def test_list_jobs_filters_and_pages(env, server):
    _, _, model = env
    with server.client() as http:
        ids = [http.post("/v1/jobs", json=body(model, targets={"pairs": [[0, 0]]})).json()["id"] for _ in range(5)]
        http.post(f"/v1/jobs/{ids[0]}/cancel")
        got, cursor = [], None
        while True:
            page = http.get("/v1/jobs", params={"limit": 2, **({"cursor": cursor} if cursor else {})}).json()
            got += [j["id"] for j in page["jobs"]]
            cursor = page["next_cursor"]
            if not cursor:
                break
        assert got == ids[::-1]
        assert [j["id"] for j in http.get("/v1/jobs", params={"state": "cancelled"}).json()["jobs"]] == [ids[0]]
        assert http.get("/v1/jobs", params={"model": "other"}).json()["jobs"] == []
        future = (utcnow() + timedelta(hours=1)).isoformat()
        assert http.get("/v1/jobs", params={"created_after": future}).json()["jobs"] == []
        assert len(http.get("/v1/jobs", params={"created_before": future}).json()["jobs"]) == 5
        assert http.get("/v1/jobs", params={"state": "bogus"}).status_code == 422
        assert http.get("/v1/jobs/" + "0" * 32).status_code == 404
        assert http.get("/v1/jobs/not-an-id").status_code == 404


def test_auth_scoping(env):
    database_url, redis_url, model = env
    with session_scope(database_url) as s:
        _, alice = create_key(s, "alice")
        _, bob = create_key(s, "bob")
        _, root = create_key(s, "root", admin=True)
        gone_row, gone = create_key(s, "gone")
        revoke_key(s, gone_row.id)
    with live_server(settings_for(database_url, redis_url, auth_enabled=True)) as srv:
        with srv.client() as anon:
            assert anon.get("/v1/jobs").status_code == 401
            assert anon.post("/v1/jobs", json=body(model)).status_code == 401
            assert anon.get("/healthz").status_code == 200
        with srv.client(gone) as http:
            assert http.get("/v1/jobs").status_code == 401
        with srv.client("sk-selfie-made-up-key-000000000000") as http:
            assert http.get("/v1/jobs").status_code == 401
        with srv.client(alice) as a, srv.client(bob) as b, srv.client(root) as r:
            job_id = a.post("/v1/jobs", json=body(model, idempotency_key="same")).json()["id"]
            # the same idempotency key under another key is another job
            bob_job = b.post("/v1/jobs", json=body(model, idempotency_key="same"))
            assert bob_job.status_code == 202 and bob_job.json()["id"] != job_id
            for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/interpretations"):
                assert a.get(path).status_code == 200
                assert b.get(path).status_code == 404
                assert r.get(path).status_code == 200
            assert b.post(f"/v1/jobs/{job_id}/cancel").status_code == 404
            assert [j["id"] for j in a.get("/v1/jobs").json()["jobs"]] == [job_id]
            assert job_id not in [j["id"] for j in b.get("/v1/jobs").json()["jobs"]]
            assert {job_id, bob_job.json()["id"]} <= {j["id"] for j in r.get("/v1/jobs").json()["jobs"]}
            assert r.post(f"/v1/jobs/{job_id}/cancel").json()["cancelled"] is True


def test_rate_limit_answers_429_with_retry_after(env):
    database_url, redis_url, _ = env
    with session_scope(database_url) as s:
        _, secret = create_key(s, "busy")
    with live_server(settings_for(database_url, redis_url, auth_enabled=True, rate_limit_per_minute=3)) as srv:
        with srv.client(secret) as http:
            responses = [http.get("/v1/jobs") for _ in range(6)]
    codes = [r.status_code for r in responses]
    # 3 per minute: at most 3 + 3 pass even when the minute turns over during the loop
    assert codes[:3] == [200, 200, 200] and 429 in codes, codes
    limited = next(r for r in responses if r.status_code == 429)
    assert int(limited.headers["retry-after"]) >= 1


def test_models_from_live_heartbeats_and_health(env, server):
    database_url, _, model = env
    with server.client() as http:
        assert http.get("/v1/models").json() == {"models": []}
        with session_scope(database_url) as s:
            heartbeat(s, WorkerIdentity("w@host:1", model, "host", 1, "cpu"))
            heartbeat(s, WorkerIdentity("old@host:2", model, "host", 2, "cuda:0"), now=utcnow() - timedelta(hours=1))
        models = http.get("/v1/models").json()["models"]
        assert [m["name"] for m in models] == [model]
        assert models[0]["num_layers"] == NUM_LAYERS and "summarize" in models[0]["presets"]
        assert [w["name"] for w in models[0]["workers"]] == ["w@host:1"]
        assert "tokenizer_json" not in models[0]["card"]
        assert models[0]["workers"][0]["devices"] == ["cpu"]
        # a worker spread over two GPUs names both, here and in its memory gauges
        memory = [{"device": f"cuda:{i}", "allocated": 10 + i, "reserved": 20, "free": 30, "total": 40}
                  for i in range(2)]
        with session_scope(database_url) as s:
            heartbeat(s, WorkerIdentity("x@host:3", model, "host", 3, "cuda:0,cuda:1"),
                      info={"devices": ["cuda:0", "cuda:1"], "gpus": [2, 3], "gpu_memory": memory})
        workers = {w["name"]: w for w in http.get("/v1/models").json()["models"][0]["workers"]}
        assert workers["x@host:3"]["devices"] == ["cuda:0", "cuda:1"]
        assert workers["x@host:3"]["device"] == "cuda:0,cuda:1"
        text = http.get("/metrics").text
        assert 'selfie_worker_gpu_memory_bytes{device="cuda:1",kind="allocated",model="%s",worker="x@host:3"} 11.0' % model in text
        assert http.get("/healthz").json() == {"status": "ok"}
        assert http.get("/readyz").json() == {"status": "ready", "database": "ok", "redis": "ok"}


def test_readyz_reports_a_dead_redis(env):
    database_url, _, _ = env
    with live_server(settings_for(database_url, "redis://127.0.0.1:1/0")) as srv, srv.client() as http:
        resp = http.get("/readyz")
    assert resp.status_code == 503 and resp.json()["redis"].startswith("error")


def test_database_down_answers_503_with_retry_after(redis_url):
    dead = "postgresql+psycopg://postgres@127.0.0.1:1/nothing?connect_timeout=1"
    with live_server(settings_for(dead, redis_url)) as srv, srv.client() as http:
        for resp in (http.get("/v1/jobs"), http.post("/v1/jobs", json=body("tiny")), http.get("/readyz")):
            assert resp.status_code == 503, resp.text
            assert int(resp.headers["retry-after"]) > 0


def test_cors_closed_by_default(server):
    with server.client() as http:
        resp = http.options("/v1/jobs", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in resp.headers


def test_broker_down_still_accepts_and_leaves_chunks_for_the_reconciler(env):
    database_url, _, model = env
    with live_server(settings_for(database_url, "redis://127.0.0.1:1/0")) as srv, srv.client() as http:
        resp = http.post("/v1/jobs", json=body(model))
    assert resp.status_code == 202 and resp.json()["enqueued"] == 0
    with session_scope(database_url) as s:
        assert s.scalars(select(Chunk.enqueued_at).where(Chunk.job_id == resp.json()["id"])).all() == [None] * 5


def test_a_catalogued_model_no_worker_serves_is_listed_and_validated(env, server, tmp_path):
    """`selfie models add` writes a card from the folder's config and tokenizer: the API lists the model with no
    workers and validates jobs for it as for a served one; valid jobs wait queued for a worker."""
    import torch

    from selfie_core.cardinfo import folder_card
    from selfie_jobs.cards import add_to_catalogue
    from tests.unit.core.conftest import _llama, build_tokenizer

    tokenizer = build_tokenizer()
    _llama(tokenizer, layers=3).to(torch.float32).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    name = "org/added-" + uuid.uuid4().hex[:8]  # a "/" as in hub ids: the tokenize routes answered 404 for it
    database_url, redis_url, _ = env
    try:
        with session_scope(database_url) as s:
            add_to_catalogue(s, name, folder_card(str(tmp_path), name, "bfloat16"), path=str(tmp_path),
                             dtype="bfloat16")
        with server.client() as http:
            listed = {m["name"]: m for m in http.get("/v1/models").json()["models"]}
            assert listed[name]["workers"] == [] and listed[name]["num_layers"] == 3
            assert listed[name]["card"]["catalogue"]["dtype"] == "bfloat16"
            bad = http.post("/v1/jobs", json=body(name, k=3))
            assert bad.status_code == 422 and "0..2" in bad.text
            ok = http.post("/v1/jobs", json=body(name, k=1, max_new_tokens=4))
            assert ok.status_code == 202, ok.text
            assert http.get(f"/v1/jobs/{ok.json()['id']}").json()["state"] == "queued"
            tokens = http.get(f"/v1/models/{name}/tokenize", params={"text": "the cat sat"})
            assert tokens.status_code == 200 and tokens.json()["ids"] == tokenizer("the cat sat").input_ids
            back = http.get(f"/v1/models/{name}/detokenize", params={"ids": ",".join(map(str, tokens.json()["ids"]))})
            assert back.status_code == 200 and back.json() == tokens.json()
    finally:
        flush_model_queue(redis_url, name)


def test_tokenize_and_detokenize_agree_and_bad_ids_are_refused(env, server):
    _, _, model = env
    with server.client() as http:
        tokens = http.get(f"/v1/models/{model}/tokenize", params={"text": "the cat sat"}).json()
        back = http.get(f"/v1/models/{model}/detokenize", params={"ids": ",".join(map(str, tokens["ids"]))})
        assert back.status_code == 200 and back.json() == tokens
        assert http.get(f"/v1/models/{model}/detokenize", params={"ids": "1,x"}).status_code == 422
        past = http.get(f"/v1/models/{model}/detokenize", params={"ids": "999999"})
        assert past.status_code == 422 and past.json()["field"] == "ids"
        assert http.get("/v1/models/nobody/detokenize", params={"ids": "1"}).status_code == 404


def test_job_events_take_the_key_and_are_bounded_per_process_outside_the_request_line(env):
    """GET /v1/jobs/{id}/events: 401 without a key, 404 for another key's job; an open stream holds neither one of
    the request slots (a status read still gets through with one slot) nor a stream beyond the bound (503)."""
    from httpx_sse import connect_sse

    database_url, redis_url, model = env
    with session_scope(database_url) as s:
        _, alice = create_key(s, "alice")
        _, bob = create_key(s, "bob")
    settings = settings_for(database_url, redis_url, auth_enabled=True, max_event_streams=1,
                            max_concurrent_requests=1, queue_wait_seconds=1, event_poll_seconds=0.1)
    with live_server(settings) as srv, srv.client() as anon, srv.client(alice) as a, srv.client(bob) as b:
        job_id = a.post("/v1/jobs", json=body(model)).json()["id"]
        path = f"/v1/jobs/{job_id}/events"
        assert anon.get(path).status_code == 401
        assert b.get(path).status_code == 404
        with connect_sse(a, "GET", path) as stream:
            events = stream.iter_sse()  # one iterator: a dropped one closes the response
            first = next(events)
            assert first.event == "status" and json.loads(first.data)["state"] == "queued"
            refused = a.get(path)
            assert refused.status_code == 503 and refused.headers["retry-after"]
            assert a.get(f"/v1/jobs/{job_id}").status_code == 200  # the one request slot is free
            a.post(f"/v1/jobs/{job_id}/cancel")
            rest = [(e.event, json.loads(e.data)["state"]) for e in events]
        assert rest == [("end", "cancelled")]  # then the stream closed
        with connect_sse(a, "GET", path) as again:  # its slot was given back
            assert [e.event for e in again.iter_sse()] == ["end"]


def test_a_frozen_broker_fails_the_send_fast_and_leaves_chunks_for_the_reconciler(env, tmp_path):
    """A Redis that keeps its connections open but no longer answers (stopped, or a half-open link) must not hold a
    submit: the send gives up within seconds and the job is stored for the reconciler, as with a dead broker."""
    import os
    import signal
    import time

    from workers.embedded import start_embedded_redis

    database_url, _, model = env
    with start_embedded_redis(tmp_path) as broker:
        pid = broker._server.pid
        with live_server(settings_for(database_url, broker.url)) as srv, srv.client() as http:
            assert http.post("/v1/jobs", json=body(model)).json()["enqueued"] == 5  # the pooled connection is open
            os.kill(pid, signal.SIGSTOP)
            try:
                started = time.monotonic()
                resp = http.post("/v1/jobs", json=body(model), timeout=30)
                took = time.monotonic() - started
            finally:
                os.kill(pid, signal.SIGCONT)
    assert resp.status_code == 202 and resp.json()["enqueued"] == 0, resp.text
    assert took < 10, took
    with session_scope(database_url) as s:
        assert s.scalars(select(Chunk.enqueued_at).where(Chunk.job_id == resp.json()["id"])).all() == [None] * 5


class StreamReader:
    """Reads an event stream's raw lines in a thread, as they come: events and keep-alive comments alike."""

    def __init__(self, http, path: str) -> None:
        import threading

        self.lines: list[str] = []
        self.closed = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(http, path), daemon=True)
        self._thread.start()

    def _read(self, http, path: str) -> None:
        try:
            with http.stream("GET", path, timeout=60) as resp:
                assert resp.status_code == 200, resp.read()
                for line in resp.iter_lines():
                    self.lines.append(line)
        finally:
            self.closed.set()

    def events(self) -> list[tuple[str, str]]:
        """(event, data) of each event so far."""
        out, lines = [], list(self.lines)
        for i, line in enumerate(lines):
            if line.startswith("event: ") and i + 1 < len(lines) and lines[i + 1].startswith("data: "):
                out.append((line[len("event: "):], lines[i + 1][len("data: "):]))
        return out

    def pings(self) -> int:
        return sum(1 for line in list(self.lines) if line.startswith(":"))

    def wait_for(self, event: str, timeout: float = 20) -> str:
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [data for name, data in self.events() if name == event]
            if found:
                return found[-1]
            if self.closed.is_set():
                break
            time.sleep(0.05)
        raise AssertionError(f"no {event!r} event; the stream read {self.lines[-20:]!r}")


@pytest.fixture
def postgres_env(postgres_url, redis_url):
    model = "tiny-" + uuid.uuid4().hex[:8]
    prepare_database(postgres_url, model=model)
    yield postgres_url, redis_url, model
    flush_model_queue(redis_url, model)


def _database_away(admin_url: str, url: str, away: bool) -> None:
    """Refuse (or allow again) new connections to the database of `url`, and end the open ones."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = make_url(url).database
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS {"false" if away else "true"}'))
        if away:
            conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :name"),
                         {"name": name})
    engine.dispose()


def test_an_event_stream_rides_out_a_database_outage_and_ends_with_an_error_past_the_retry_window(
        postgres_env, postgres_admin_url):
    """The database going away mid-stream skips polls (keep-alives go on, the stream resumes when it is back); an
    outage longer than db_retry_seconds ends the stream with an `error` event, never a torn connection."""
    import time

    database_url, redis_url, model = postgres_env
    settings = settings_for(database_url, redis_url, event_poll_seconds=0.1, event_ping_seconds=1,
                            db_retry_seconds=4)
    with live_server(settings) as srv, srv.client() as http:
        job_id = http.post("/v1/jobs", json=body(model)).json()["id"]
        stream = StreamReader(http, f"/v1/jobs/{job_id}/events")
        assert json.loads(stream.wait_for("status"))["state"] == "queued"
        pings = stream.pings()
        _database_away(postgres_admin_url, database_url, True)
        try:
            time.sleep(2.5)
        finally:
            _database_away(postgres_admin_url, database_url, False)
        assert stream.pings() > pings and not stream.closed.is_set(), stream.lines
        assert [name for name, _ in stream.events()] == ["status"]
        assert http.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
        assert json.loads(stream.wait_for("end"))["state"] == "cancelled"

        job_id = http.post("/v1/jobs", json=body(model)).json()["id"]
        stream = StreamReader(http, f"/v1/jobs/{job_id}/events")
        stream.wait_for("status")
        _database_away(postgres_admin_url, database_url, True)
        try:
            assert "database is unavailable" in stream.wait_for("error", timeout=30)
            assert stream.closed.wait(5)
        finally:
            _database_away(postgres_admin_url, database_url, False)


def test_an_event_stream_ends_when_its_key_is_revoked(env):
    database_url, redis_url, model = env
    with session_scope(database_url) as s:
        key, secret = create_key(s, "carol")
        key_id = key.id
    settings = settings_for(database_url, redis_url, auth_enabled=True, event_poll_seconds=0.1)
    with live_server(settings) as srv, srv.client(secret) as http:
        job_id = http.post("/v1/jobs", json=body(model)).json()["id"]
        stream = StreamReader(http, f"/v1/jobs/{job_id}/events")
        stream.wait_for("status")
        with session_scope(database_url) as s:
            revoke_key(s, key_id)
        assert "no longer valid" in stream.wait_for("error")
        assert stream.closed.wait(5)
        assert http.get(f"/v1/jobs/{job_id}").status_code == 401
