"""The edit kinds over real HTTP (uvicorn), SQLite and PostgreSQL, real Redis: POST /v1/edits/supervised and
/v1/edits/reinforce store one job of one chunk and send one `selfie.run_edit` message on the model's queue; every
bad field is a clear 4xx with nothing stored and nothing enqueued."""

from __future__ import annotations

import base64
import json
import uuid

import pytest
from sqlalchemy import func, select

from selfie_jobs.db import session_scope
from selfie_jobs.models import Chunk, Job
from selfie_jobs.queue import RUN_EDIT_TASK
from tests.apisupport import (
    NUM_LAYERS,
    flush_model_queue,
    live_server,
    prepare_database,
    queued_messages,
    settings_for,
    tiny_card,
)

HIDDEN = 16  # the tiny card's hidden size
SOURCE = {"prompt": "the cat sat on the mat", "layer": 2, "token": -1}


@pytest.fixture
def env(database_url, redis_url):
    model = "tiny-" + uuid.uuid4().hex[:8]
    prepare_database(database_url, model=model)
    yield database_url, redis_url, model
    flush_model_queue(redis_url, model)


@pytest.fixture
def server(env):
    database_url, redis_url, model = env
    settings = settings_for(database_url, redis_url, default_model=model, max_edit_epochs=50, max_reference_texts=3,
                            max_reference_chars=40)
    with live_server(settings) as srv:
        yield srv


def count(url, entity) -> int:
    with session_scope(url) as s:
        return s.scalar(select(func.count()).select_from(entity))


def supervised(**kw):
    return {"source": dict(SOURCE), "target_vector": [0.25] * HIDDEN, "epochs": 3, **kw}


def reinforce(**kw):
    return {"prompt": "the cat sat on the mat", "layer": 2, "judge": {"type": "keywords", "words": ["paris"]},
            "epochs": 3, "max_new_tokens": 8, **kw}


def test_edits_are_stored_as_one_chunk_and_sent_as_run_edit(env, server):
    database_url, redis_url, model = env
    with server.client() as http:
        a = http.post("/v1/edits/supervised", json=supervised(target={"prompt": "a dog ran", "layer": 0,
                                                                      "token": 1}, target_vector=None))
        # a judge on the edited model asks in its chat format: a model without a chat template has none to judge
        refused = http.post("/v1/edits/reinforce", json=reinforce(judge={"type": "model"}))
        assert refused.status_code == 422 and "chat template" in refused.text and "judge" in refused.text
        prepare_database(database_url, model=model, card=tiny_card(name=model, chat_template="{{ messages }}"))
        b = http.post("/v1/edits/reinforce", json=reinforce(judge={"type": "model"}))
        assert a.status_code == 202, a.text
        assert b.status_code == 202, b.text
        job = http.get(a.json()["link"]).json()
        assert job["kind"] == "supervised" and job["progress"]["total"] == 1
        assert job["edit"] == {"epochs_done": 0, "epochs_total": 3}
        spec = job["spec"]
        assert spec["source"] == {"prompt": "the cat sat on the mat", "layer": 2, "token": 6}  # <s> + 6 words
        assert spec["anchor"] == "original" and spec["beta"] == 10.0 and spec["lr"] == 3e-4
        assert spec["reference_texts"] is None  # the built-in set, read by the worker
        results = http.get(a.json()["link"] + "/results").json()
        assert results["items"] == [] and results["variant"] is None
        assert http.get(b.json()["link"]).json()["spec"]["judge"]["model"] == job["model"]
    assert count(database_url, Job) == count(database_url, Chunk) == 2
    messages = queued_messages(redis_url, job["model"])
    assert sorted(m["headers"]["task"] for m in messages) == [RUN_EDIT_TASK, RUN_EDIT_TASK]
    with session_scope(database_url) as s:
        assert len({c.batch_key for c in s.scalars(select(Chunk))}) == 2  # never batched together
        body = messages[0]["body"]
        args = json.loads(base64.b64decode(body))[0]
        assert s.get(Chunk, args[0]).items == [[0]]


BAD = [
    ("/v1/edits/supervised", supervised(source={**SOURCE, "layer": 0}), 422, "layer 0"),
    ("/v1/edits/supervised", supervised(source={**SOURCE, "layer": NUM_LAYERS + 1}), 422, "out of range"),
    ("/v1/edits/supervised", supervised(source={**SOURCE, "token": 40}), 422, "token"),
    ("/v1/edits/supervised", supervised(target_vector=[0.5] * (HIDDEN + 1)), 422, "hidden size"),
    ("/v1/edits/supervised", supervised(target_vector=[1e39] * HIDDEN), 422, "float32"),
    ("/v1/edits/supervised", supervised(target={"prompt": "a dog", "layer": 1, "token": 0}), 422, "exactly one"),
    ("/v1/edits/supervised", supervised(target_vector=None), 422, "exactly one"),
    ("/v1/edits/supervised", supervised(target_vector=None, target={"prompt": "a dog", "layer": 9, "token": 0}),
     422, "layer 9"),
    ("/v1/edits/supervised", supervised(epochs=51), 413, "epochs"),
    ("/v1/edits/supervised", supervised(epochs=0), 422, "epochs"),
    ("/v1/edits/supervised", supervised(lr=0), 422, "lr"),
    ("/v1/edits/supervised", supervised(lr=-1e-3), 422, "lr"),
    ("/v1/edits/supervised", supervised(lr=True), 422, "lr"),
    ("/v1/edits/supervised", supervised(reference_texts=["a cat"] * 4), 413, "reference texts"),
    ("/v1/edits/supervised", supervised(reference_texts=["a cat " * 10]), 413, "characters"),
    ("/v1/edits/supervised", supervised(reference_texts=["   "]), 422, "empty"),
    ("/v1/edits/supervised", supervised(anchor="sometimes"), 422, "anchor"),
    ("/v1/edits/supervised", supervised(evaluations={"behaviour": {"requests": ["x"], "detector": {"kind": "?"}}}),
     422, "detector"),
    ("/v1/edits/supervised", supervised(variant="0" * 32), 422, "variant"),
    ("/v1/edits/reinforce", reinforce(layer=0), 422, "layer 0"),
    ("/v1/edits/reinforce", reinforce(judge={"type": "model", "model": "nobody-serves-this"}), 422, "judge.model"),
    ("/v1/edits/reinforce", reinforce(judge={"type": "keywords"}), 422, "judge"),
    ("/v1/edits/reinforce", reinforce(judge={"type": "model", "question": "no field"}), 422, "interpretation"),
    ("/v1/edits/reinforce", reinforce(judge={"type": "oracle"}), 422, "judge"),
    ("/v1/edits/reinforce", reinforce(k=NUM_LAYERS), 422, "k="),
    ("/v1/edits/reinforce", reinforce(epochs=10_000), 413, "epochs"),
    # a judge's question: plain {interpretation} fields only (str.format reads attributes and pads to any width)
    *[("/v1/edits/reinforce", reinforce(judge={"type": "model", "question": f"{{interpretation}} {field}"}), 422,
       "only plain {interpretation} fields")
      for field in ("{interpretation.foo}", "{interpretation.__init__.__globals__}", "{interpretation[a]}",
                    "{interpretation:>300000}", "{interpretation:>100000000}", "{interpretation:{interpretation}}",
                    "{interpretation!r}", "{0}")],
    # the evaluations' inputs get the checks prompts get
    ("/v1/edits/supervised", supervised(evaluations={"knowledge": {"facts": [{"prompt": "word " * 3000,
                                                                              "attribute": "x"}]}}),
     413, "evaluations.knowledge.facts[0].prompt"),
    ("/v1/edits/supervised", supervised(evaluations={"knowledge": {"facts": [{"prompt": "Paris is in",
                                                                              "attribute": "France"},
                                                                             {"prompt": " ", "attribute": "x"}]}}),
     422, "evaluations.knowledge.facts[1].prompt is empty"),
    ("/v1/edits/supervised", supervised(evaluations={"knowledge": {"facts": [{"prompt": "a", "attribute": " "}]}}),
     422, "evaluations.knowledge.facts[0].attribute"),
    ("/v1/edits/supervised", supervised(evaluations={"knowledge": {"facts": [{"prompt": "cat " * 45,
                                                                              "attribute": "x"}]}}),
     422, "exceeds the context"),
    ("/v1/edits/supervised", supervised(evaluations={"behaviour": {"requests": ["word " * 3000],
                                                                   "detector": {"kind": "keywords", "words": ["a"]}}}),
     413, "evaluations.behaviour.requests[0]"),
    ("/v1/edits/supervised", supervised(evaluations={"behaviour": {"requests": ["  "],
                                                                   "detector": {"kind": "keywords", "words": ["a"]}}}),
     422, "evaluations.behaviour.requests[0] is empty"),
    ("/v1/edits/supervised", supervised(evaluations={"behaviour": {"requests": ["x"], "max_new_tokens": 1000,
                                                                   "detector": {"kind": "keywords", "words": ["a"]}}}),
     422, "evaluations.behaviour.max_new_tokens=1000; at most 32"),
    ("/v1/edits/supervised", supervised(evaluations={"behaviour": {"requests": ["cat " * 30], "max_new_tokens": 20,
                                                                   "detector": {"kind": "keywords", "words": ["a"]}}}),
     422, "exceeds the context"),  # 31 tokens and 20 new ones, past the context of 48
    # engine options an edit does not use are refused, not dropped
    ("/v1/edits/supervised", supervised(decoding={"do_sample": True, "temperature": 5.0}), 422, "decoding"),
    ("/v1/edits/supervised", supervised(injection_mode="add"), 422, "injection_mode"),
    ("/v1/edits/reinforce", reinforce(grounding={"min_mean_relevancy": 0.9}), 422, "grounding"),
    ("/v1/edits/reinforce", reinforce(injection_strength=2.0), 422, "injection_strength"),
    # detector configs: a kind's own fields only, names not blank
    ("/v1/edits/reinforce", reinforce(judge={"type": "keywords", "words": ["a"], "patterns": ["("]}), 422,
     "patterns do(es) not apply"),
    ("/v1/edits/reinforce", reinforce(judge={"type": "concepts", "concepts": {"": ["x"]}}), 422, "concepts"),
    ("/v1/edits/reinforce", reinforce(judge={"type": "concepts", "concepts": {" ": ["x"]}}), 422, "blank"),
    ("/v1/edits/supervised", supervised(evaluations={"behaviour": {"requests": ["x"], "detector": {
        "kind": "keywords", "words": ["a"], "junk": {"deep": [1, 2]}}}}), 422, "not junk"),
    ("/v1/edits/supervised", supervised(evaluations={"behaviour": {"requests": ["x"], "detector": {
        "kind": "keywords", "words": ["a"], "name": ""}}}), 422, "name"),
    ("/v1/edits/supervised", supervised(evaluations={"behaviour": {"requests": ["x"], "detector": {
        "kind": "concepts", "concepts": {"": ["x"]}}}}), 422, "concept's name"),
    # a rate that is 0 in float32 trains nothing
    ("/v1/edits/supervised", supervised(lr=1e-320), 422, "lr"),
    ("/v1/edits/reinforce", reinforce(lr=1e-13), 422, "lr"),
]


@pytest.mark.parametrize("path,body,status,words", BAD, ids=[f"{i}-{b[3]}" for i, b in enumerate(BAD)])
def test_bad_fields_are_refused_and_nothing_is_stored(env, server, path, body, status, words):
    database_url, redis_url, model = env
    with server.client() as http:
        resp = http.post(path, json=body)
    assert resp.status_code == status, resp.text
    assert words in resp.text
    assert count(database_url, Job) == count(database_url, Chunk) == 0
    assert queued_messages(redis_url, model) == []


def test_the_edit_schemas_leave_out_the_engine_options_edits_refuse(server):
    with server.client() as http:
        schemas = http.get("/openapi.json").json()["components"]["schemas"]
    for name in ("SupervisedEditCreate", "ReinforceEditCreate"):
        properties = schemas[name]["properties"]
        assert {"template", "k", "max_new_tokens", "evaluations"} <= set(properties), name
        assert not {"decoding", "injection_mode", "injection_strength", "grounding"} & set(properties), name
        assert schemas[name]["examples"], name


def live_worker(database_url, model, name=None):
    """A worker row of `model` that heartbeats now (what a running worker writes)."""
    from selfie_jobs.models import Worker

    with session_scope(database_url) as s:
        s.add(Worker(name=name or f"w-{uuid.uuid4().hex[:8]}", model=model, hostname="elsewhere", pid=1, device="cpu",
                     state="ready"))


def test_a_judge_on_another_served_model_is_checked_as_a_generate_job_on_it(env, server):
    database_url, redis_url, model = env
    plain, chat = "other-" + uuid.uuid4().hex[:8], "chat-" + uuid.uuid4().hex[:8]
    prepare_database(database_url, model=plain)
    prepare_database(database_url, model=chat, card=tiny_card(name=chat, chat_template="{{ messages }}"))
    with server.client() as http:
        refused = http.post("/v1/edits/reinforce", json=reinforce(judge={"type": "model", "model": plain}))
        assert refused.status_code == 422 and "judge.model" in refused.text and "chat template" in refused.text
        # a card outlives its workers: a judge model nobody serves now is refused, not waited for
        unserved = http.post("/v1/edits/reinforce", json=reinforce(judge={"type": "model", "model": chat}))
        assert unserved.status_code == 422, unserved.text
        assert "judge.model" in unserved.text and "no live worker" in unserved.text
        assert count(database_url, Job) == 0
        live_worker(database_url, chat)
        # each epoch's generate job holds one judge prompt per position: more positions than a job takes prompts
        long = http.post("/v1/edits/reinforce", json=reinforce(prompt=" ".join(["cat"] * 25),
                                                               judge={"type": "model", "model": chat}))
        assert long.status_code == 422 and "SELFIE_MAX_PROMPTS_PER_JOB" in long.text, long.text
        assert count(database_url, Job) == 0
        accepted = http.post("/v1/edits/reinforce", json=reinforce(judge={"type": "model", "model": chat}))
        assert accepted.status_code == 202, accepted.text
        judge = http.get(accepted.json()["link"]).json()["spec"]["judge"]
    assert judge["model"] == chat and judge["remote"] is True


def test_a_remote_judges_edit_counts_its_judge_generations_in_the_quota(env):
    """The edit's own item and epochs x positions judge generations (its sub-jobs' prompts, submitted later by the
    worker under the edit's key) are checked against the key's daily quota when the edit is submitted."""
    from selfie_jobs.auth import create_key

    database_url, redis_url, model = env
    chat = "chat-" + uuid.uuid4().hex[:8]
    prepare_database(database_url, model=chat, card=tiny_card(name=chat, chat_template="{{ messages }}"))
    live_worker(database_url, chat)
    with session_scope(database_url) as s:
        _, secret = create_key(s, "small", daily_quota=1 + 3 * 7)  # 3 epochs x 7 positions (<s> + 6 words)
    settings = settings_for(database_url, redis_url, default_model=model, auth_enabled=True)
    with live_server(settings) as srv, srv.client(secret) as http:
        body = reinforce(judge={"type": "model", "model": chat})
        too_many = http.post("/v1/edits/reinforce", json={**body, "epochs": 4})
        assert too_many.status_code == 429 and "this job asks for 29" in too_many.text, too_many.text
        assert count(database_url, Job) == 0
        assert http.post("/v1/edits/reinforce", json=body).status_code == 202
        # the quota counts stored jobs: the edit's one item so far (its sub-jobs count as the worker submits them);
        # a detector judge's edit costs its one item
        assert http.post("/v1/edits/reinforce", json=reinforce()).status_code == 202


ORIGINAL_DATA = __import__("pathlib").Path(__file__).resolve().parents[3] / "shared" / "data" / "selfie-original"


def test_the_cli_sends_the_originals_facts_and_behaviours_files_as_the_edits_evaluations(env, server, tmp_path):
    """`selfie edit ... --facts FILE --behaviours FILE --behaviour-keywords W --eval-limit N`: the original's CSV
    of facts (its prompt and attribute columns) and its one-request-per-line behaviour file reach the job's spec."""
    from click.testing import CliRunner

    from selfie_cli.main import cli
    from selfie_client.edits import behaviours_from_file, facts_from_csv

    facts_csv, behaviours = ORIGINAL_DATA / "filtered_known_1000_with_output.csv", ORIGINAL_DATA / \
        "transfer_expriment_behaviors.csv"
    if not facts_csv.exists():
        pytest.skip("the original's data sets are not next to the project")
    database_url, _, model = env
    # the original's facts and behaviour requests are longer than the tiny card's context of 48 tokens
    prepare_database(database_url, model=model, card=tiny_card(name=model, max_context=1024))
    result = CliRunner().invoke(cli, [
        "edit", "supervised", "--url", server.url, "--prompt", SOURCE["prompt"], "--layer", "2", "--token", "-1",
        "--target-prompt", "a dog ran", "--target-layer", "2", "--target-token", "1", "--epochs", "3",
        "--facts", str(facts_csv), "--behaviours", str(behaviours), "--behaviour-keywords", "bomb, weapon",
        "--eval-limit", "25", "--no-wait"])
    assert result.exit_code == 0, result.output
    with session_scope(database_url) as s:
        job = s.scalars(select(Job).where(Job.kind == "supervised")).one()
        evaluations = job.spec["evaluations"]
    assert evaluations["knowledge"]["facts"] == facts_from_csv(facts_csv, 25)
    assert evaluations["knowledge"]["facts"][0] == {"prompt": "Vinson Massif is located in the continent of",
                                                    "attribute": "Antarctica"}
    assert evaluations["behaviour"]["requests"] == behaviours_from_file(behaviours, 25)
    assert evaluations["behaviour"]["detector"]["words"] == ["bomb", "weapon"]

    # a file without the columns, and a behaviour file without its keywords: clear errors, nothing stored
    bad = tmp_path / "bad.csv"
    bad.write_text("question,answer\nq,a\n", encoding="utf-8")
    for extra, words in ((["--facts", str(bad)], "'prompt' and 'attribute' columns"),
                         (["--behaviours", str(behaviours)], "go together")):
        result = CliRunner().invoke(cli, [
            "edit", "reinforce", "--url", server.url, "--prompt", "the cat", "--layer", "2", "--keywords", "paris",
            "--no-wait", *extra])
        assert result.exit_code != 0 and words in result.output, result.output
    assert count(database_url, Job) == 1


def test_the_cli_passes_every_edit_option_and_refuses_unclear_ones(env, server, tmp_path):
    """The edit commands take the job options the API has (priority, idempotency key, time to live, the
    interpretations' template, k and new tokens) and a target vector in the shapes `submit --vectors` reads; an
    option that would be ignored or two judges at once are refused with the reason."""
    from click.testing import CliRunner

    from selfie_cli.main import cli

    database_url = env[0]
    target = tmp_path / "target.json"
    target.write_text(json.dumps({"vectors": [[0.25] * HIDDEN]}), encoding="utf-8")
    base = ["edit", "supervised", "--url", server.url, "--prompt", SOURCE["prompt"], "--layer", "2", "--token", "-1",
            "--epochs", "3", "--no-wait"]
    ok = CliRunner().invoke(cli, [*base, "--target-vector", str(target), "--priority", "8", "--idempotency-key",
                                  "edit-1", "--ttl", "86400", "--template", "describe", "--k", "1",
                                  "--max-new-tokens", "7"])
    assert ok.exit_code == 0, ok.output
    again = CliRunner().invoke(cli, [*base, "--target-vector", str(target), "--priority", "8", "--idempotency-key",
                                     "edit-1", "--ttl", "86400", "--template", "describe", "--k", "1",
                                     "--max-new-tokens", "7"])
    assert again.exit_code == 0, again.output
    with session_scope(database_url) as s:
        (job,) = s.scalars(select(Job).where(Job.kind == "supervised")).all()  # the same key: one job
        assert (job.priority, job.ttl_seconds) == (8, 86400)
        assert job.spec["target_vector"] == [0.25] * HIDDEN and job.spec["injection"]["k"] == 1
        assert job.spec["generation"]["max_new_tokens"] == 7 and job.spec["template"]["preset"] == "describe"
    for content, words in (("[[0.1, 0.2]]", "JSON list of numbers"), ('{"vector": "x"}', "JSON list of numbers"),
                           ("not json", "is not JSON")):
        target.write_text(content, encoding="utf-8")
        bad = CliRunner().invoke(cli, [*base, "--target-vector", str(target)])
        assert bad.exit_code != 0 and words in bad.output, bad.output
    target.write_text(json.dumps([0.25] * HIDDEN), encoding="utf-8")
    limited = CliRunner().invoke(cli, [*base, "--target-vector", str(target), "--knowledge",
                                       "--eval-limit", "5"])
    assert limited.exit_code == 2 and "--eval-limit cuts the --facts and --behaviours files" in limited.output
    both = CliRunner().invoke(cli, ["edit", "reinforce", "--url", server.url, "--prompt", "the cat", "--layer", "2",
                                    "--keywords", "paris", "--judge", '{"type": "model"}', "--no-wait"])
    assert both.exit_code == 2 and "not both" in both.output, both.output
    with session_scope(database_url) as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 1
