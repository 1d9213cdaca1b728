"""The `lenses` kind over real HTTP (uvicorn), SQLite and PostgreSQL, real Redis: a request is planned like an
interpret job's (the same targets), stored and enqueued under a batch key of its own; every bad input is a clear
4xx with nothing stored and nothing enqueued."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import func, select

from selfie_jobs.db import session_scope
from selfie_jobs.models import Chunk, Job, LensReading, Prompt
from tests.apisupport import NUM_LAYERS, flush_model_queue, live_server, prepare_database, queued_messages, \
    settings_for

PROMPT = "the cat sat on the mat"  # 7 tokens with the tiny card's BOS


@pytest.fixture
def env(database_url, redis_url):
    model = "tiny-" + uuid.uuid4().hex[:8]
    prepare_database(database_url, model=model)
    yield database_url, redis_url, model
    flush_model_queue(redis_url, model)


@pytest.fixture
def server(env):
    database_url, redis_url, _ = env
    with live_server(settings_for(database_url, redis_url)) as srv:
        yield srv


def count(url, entity) -> int:
    with session_scope(url) as s:
        return s.scalar(select(func.count()).select_from(entity))


def test_a_lens_job_is_planned_like_an_interpret_job_and_enqueued(env, server):
    database_url, redis_url, model = env
    body = {"model": model, "prompts": [PROMPT], "targets": {"layers": "all", "tokens": [0, -1]}, "top_k": 3,
            "lenses": ["identity"]}
    with server.client() as http:
        resp = http.post("/v1/jobs/lenses", json=body)
        assert resp.status_code == 202, resp.text
        accepted = resp.json()
        interpret = http.post("/v1/jobs", json={"model": model, "prompts": [PROMPT],
                                                "targets": {"layers": "all", "tokens": [0, -1]}}).json()
        results = http.get(f"/v1/jobs/{accepted['id']}/results").json()
        csv = http.get(f"/v1/jobs/{accepted['id']}/results", params={"format": "csv"})
    assert accepted["kind"] == "lenses" and accepted["total"] == (NUM_LAYERS + 1) * 2
    assert accepted["links"]["interpretations"] is None
    assert results["items"] == [] and "identity_matches" in results["columns"]
    assert csv.status_code == 200 and csv.text.splitlines()[0].startswith("prompt_index,layer,token,source_token")
    with session_scope(database_url) as s:
        job = s.get(Job, accepted["id"])
        other = s.get(Job, interpret["id"])
        items = [i for c in s.scalars(select(Chunk).where(Chunk.job_id == job.id).order_by(Chunk.index)) for i in c.items]
        other_items = [i for c in s.scalars(select(Chunk).where(Chunk.job_id == other.id).order_by(Chunk.index))
                       for i in c.items]
        prompts = s.scalars(select(Prompt.text).where(Prompt.job_id == job.id)).all()
    assert job.spec == {"lenses": ["identity"], "top_k": 3}
    assert job.batch_key != other.batch_key
    assert items == other_items and prompts == [PROMPT]
    assert len(queued_messages(redis_url, model)) == 2 + 2  # 10 items a job, 8 a chunk: two chunks each


BAD = [
    ("top_k zero", {"top_k": 0}, "top_k"),
    ("top_k past 100", {"top_k": 101}, "top_k"),
    ("top_k a string", {"top_k": "5"}, "top_k"),
    ("top_k a boolean", {"top_k": True}, "top_k"),
    ("top_k a float", {"top_k": 2.5}, "top_k"),
    ("a lens that does not exist", {"lenses": ["tuned"]}, "lenses"),
    ("no lens", {"lenses": []}, "lenses"),
    ("a lens twice", {"lenses": ["logit", "logit"]}, "lenses"),
    ("lenses not a list", {"lenses": "logit"}, "lenses"),
    ("layer past the depth", {"targets": {"layers": [NUM_LAYERS + 1], "tokens": [0]}}, "layer"),
    ("token past the end", {"targets": {"pairs": [[1, 40]]}}, "token"),
    ("layer as a string", {"targets": {"pairs": [["1", 0]]}}, "targets"),
    ("blank prompt", {"prompts": ["   "]}, "prompt"),
    ("unknown model", {"model": "no-such-model"}, "model"),
    ("unknown field", {"vectors": [[0.5]]}, "vectors"),
    ("a template", {"template": "summarize"}, "generates nothing"),
    ("max_new_tokens", {"max_new_tokens": 5}, "generates nothing"),
    ("an injection layer", {"k": 1}, "generates nothing"),
    ("too many readings", {"prompts": [PROMPT] * 20, "targets": "all"}, "at most"),
]


@pytest.mark.parametrize("name, change, says", BAD, ids=[b[0] for b in BAD])
def test_bad_lens_requests_are_refused_with_nothing_stored(env, server, name, change, says):
    database_url, redis_url, model = env
    body = {"model": model, "prompts": [PROMPT], "targets": {"layers": [1], "tokens": [0]}, **change}
    with server.client() as http:
        resp = http.post("/v1/jobs/lenses", json=body)
    assert 400 <= resp.status_code < 500, (name, resp.status_code, resp.text)
    assert says in resp.text, resp.text
    assert count(database_url, Job) == count(database_url, Chunk) == count(database_url, Prompt) == 0
    assert count(database_url, LensReading) == 0
    assert queued_messages(redis_url, model) == []
