"""The `generate` kind over real HTTP (uvicorn), SQLite and PostgreSQL, real Redis: a request is planned into one item
per prompt, stored with its prompts and enqueued under a batch key of its own; its OpenAPI schema has an example and
none of the interpretation's options; every bad input is a clear 4xx with nothing stored and nothing enqueued."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import func, select

from selfie_jobs.db import session_scope
from selfie_jobs.models import Chunk, Generation, Job, Prompt
from tests.apisupport import MAX_CONTEXT, flush_model_queue, live_server, prepare_database, queued_messages, \
    settings_for, tiny_card

PROMPT = "the cat sat on the mat"  # 7 tokens with the tiny card's BOS
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CHAT_TURN = 6  # tokens the chat card says its template adds around a user turn


@pytest.fixture
def env(database_url, redis_url):
    model = "tiny-" + uuid.uuid4().hex[:8]
    prepare_database(database_url, model=model, card=tiny_card(name=model, chat_template=CHATML,
                                                               chat_turn_tokens=CHAT_TURN))
    raw_model = model + "-raw"  # a card without a chat template
    prepare_database(database_url, model=raw_model, card=tiny_card(name=raw_model))
    yield database_url, redis_url, model, raw_model
    flush_model_queue(redis_url, model)
    flush_model_queue(redis_url, raw_model)


@pytest.fixture
def server(env):
    database_url, redis_url, _, _ = env
    with live_server(settings_for(database_url, redis_url, chunk_size=2)) as srv:
        yield srv


def count(url, entity) -> int:
    with session_scope(url) as s:
        return s.scalar(select(func.count()).select_from(entity))


def test_a_generate_job_is_one_item_per_prompt_stored_and_enqueued(env, server):
    database_url, redis_url, model, raw_model = env
    body = {"model": model, "prompts": [PROMPT, "a dog ran to the park"], "max_new_tokens": 5,
            "decoding": {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "seed": 3}, "system": "be brief"}
    with server.client() as http:
        resp = http.post("/v1/jobs/generate", json=body)
        assert resp.status_code == 202, resp.text
        accepted = resp.json()
        greedy = http.post("/v1/jobs/generate", json={"model": raw_model, "prompts": PROMPT, "chat": False,
                                                      "decoding": {"seed": 5}}).json()
        again = http.post("/v1/jobs/generate", json={**body, "idempotency_key": "k1"})
        replay = http.post("/v1/jobs/generate", json={**body, "idempotency_key": "k1"})
        clash = http.post("/v1/jobs/generate", json={**body, "max_new_tokens": 6, "idempotency_key": "k1"})
        results = http.get(f"/v1/jobs/{accepted['id']}/results").json()
        csv = http.get(f"/v1/jobs/{accepted['id']}/results", params={"format": "csv"})
        status = http.get(f"/v1/jobs/{accepted['id']}").json()
        schema = http.get("/openapi.json").json()
    assert accepted["kind"] == "generate" and accepted["total"] == 2 and accepted["links"]["interpretations"] is None
    assert again.status_code == 202 and replay.status_code == 200 and replay.json()["id"] == again.json()["id"]
    assert clash.status_code == 409
    assert results["items"] == [] and results["columns"][:3] == ["prompt_index", "text", "finish"]
    assert csv.status_code == 200 and csv.text.splitlines()[0].startswith("prompt_index,text,finish,token_ids")
    assert status["kind"] == "generate" and [p["text"] for p in status["prompts"]] == [PROMPT, "a dog ran to the park"]
    with session_scope(database_url) as s:
        job = s.get(Job, accepted["id"])
        plain = s.get(Job, greedy["id"])
        items = [i for c in s.scalars(select(Chunk).where(Chunk.job_id == job.id).order_by(Chunk.index)) for i in c.items]
        prompts = s.scalars(select(Prompt.text).where(Prompt.job_id == job.id).order_by(Prompt.index)).all()
    assert job.spec == {"chat": True, "system": "be brief", "generation": {
        "max_new_tokens": 5, "do_sample": True, "temperature": 0.7, "top_p": 0.9, "seed": 3}}
    # greedy: the sampling options change nothing and are stored as their defaults (greedy jobs share batches)
    assert plain.spec == {"chat": False, "system": None, "generation": {
        "max_new_tokens": 30, "do_sample": False, "temperature": 1.0, "top_p": 1.0, "seed": None}}
    assert job.batch_key != plain.batch_key
    assert items == [[0], [1]] and prompts == [PROMPT, "a dog ran to the park"]
    assert len(queued_messages(redis_url, model)) == 1 + 1  # two prompts in one chunk, twice (the replay sends none)
    request_schema = schema["components"]["schemas"]["GenerateJobCreate"]
    assert request_schema["examples"] and {"prompts", "chat", "system", "max_new_tokens", "decoding"} <= set(
        request_schema["properties"])
    assert not {"template", "k", "injection_mode", "grounding"} & set(request_schema["properties"])
    assert "/v1/jobs/generate" in schema["paths"]


BAD = [
    ("no prompts", {"prompts": []}, "prompts"),
    ("blank prompt", {"prompts": ["   "]}, "prompt 0 is empty"),
    ("prompt not text", {"prompts": [3]}, "prompts"),
    ("NUL in a prompt", {"prompts": ["a\x00b"]}, "NUL"),
    ("too many prompts", {"prompts": [PROMPT] * 21}, "at most 20"),
    ("prompt too long", {"prompts": ["cat " * 101]}, "at most 400"),
    ("prompt past the context", {"prompts": [" ".join(["cat"] * 40)], "max_new_tokens": 5}, "context"),
    ("chat turn past the context", {"prompts": [" ".join(["cat"] * (MAX_CONTEXT - CHAT_TURN - 5))],
                                    "max_new_tokens": 5}, "chat format"),
    ("max_new_tokens zero", {"max_new_tokens": 0}, "max_new_tokens"),
    ("max_new_tokens past the cap", {"max_new_tokens": 33}, "at most 32"),
    ("max_new_tokens a string", {"max_new_tokens": "5"}, "max_new_tokens"),
    ("chat not a boolean", {"chat": "yes"}, "chat"),
    ("chat a number", {"chat": 1}, "chat"),
    ("system blank", {"system": "   "}, "blank"),
    ("system empty", {"system": ""}, "system"),
    ("system without chat", {"chat": False, "system": "be brief"}, "chat format"),
    ("system private-use", {"system": "a\ue001b"}, "private-use"),
    ("system too long", {"system": "x" * 4001}, "system"),
    ("temperature zero", {"decoding": {"do_sample": True, "temperature": 0}}, "temperature"),
    ("top_p past 1", {"decoding": {"do_sample": True, "top_p": 1.5}}, "top_p"),
    ("seed negative", {"decoding": {"do_sample": True, "seed": -1}}, "seed"),
    ("decoding unknown field", {"decoding": {"beams": 2}}, "beams"),
    ("priority past 9", {"priority": 10}, "priority"),
    ("ttl zero", {"ttl_seconds": 0}, "ttl_seconds"),
    ("unknown model", {"model": "no-such-model"}, "model"),
    ("unknown field", {"targets": "all"}, "targets"),
    ("a template", {"template": "summarize"}, "injects and interprets nothing"),
    ("an injection layer", {"k": 1}, "injects and interprets nothing"),
    ("grounding", {"grounding": {"min_mean_relevancy": 0.1}}, "injects and interprets nothing"),
]


@pytest.mark.parametrize("name, change, says", BAD, ids=[b[0] for b in BAD])
def test_bad_generate_requests_are_refused_with_nothing_stored(env, server, name, change, says):
    database_url, redis_url, model, _ = env
    body = {"model": model, "prompts": [PROMPT], "max_new_tokens": 4, **change}
    with server.client() as http:
        resp = http.post("/v1/jobs/generate", json=body)
    assert 400 <= resp.status_code < 500, (name, resp.status_code, resp.text)
    assert says in resp.text, resp.text
    assert count(database_url, Job) == count(database_url, Chunk) == count(database_url, Prompt) == 0
    assert count(database_url, Generation) == 0
    assert queued_messages(redis_url, model) == []


def test_chat_on_a_model_without_a_chat_template_is_refused_and_raw_is_taken(env, server):
    database_url, redis_url, _, raw_model = env
    with server.client() as http:
        refused = http.post("/v1/jobs/generate", json={"model": raw_model, "prompts": [PROMPT]})
        assert count(database_url, Job) == 0 and queued_messages(redis_url, raw_model) == []
        taken = http.post("/v1/jobs/generate", json={"model": raw_model, "prompts": [PROMPT], "chat": False})
    assert refused.status_code == 422 and "no chat template" in refused.text and "chat=false" in refused.text
    assert taken.status_code == 202 and count(database_url, Job) == 1
