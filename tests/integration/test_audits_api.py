"""Audits over real HTTP (uvicorn), real Redis and SQLite/PostgreSQL: upload, define, run, report, CSV, metrics.

The fan-out and the tick are the task bodies a worker runs (`workers.audits`); results are written through the
real chunk write path by a stand-in for the engine (the real-worker test is `test_audits_worker.py`).
"""

from __future__ import annotations

import csv
import io
import json

import pytest
import redis

from api.broker import make_producer
from selfie_jobs.queue import CONTROL_QUEUE, RUN_AUDIT_TASK
from tests.apisupport import live_server, prepare_database, settings_for
from tests.unit.jobs.audits.support import run_all_chunks
from workers import audits as W

pytestmark = pytest.mark.timeout(180)

PROMPTS = ["the cat sat on the mat", "a dog ran to the park", "the eiffel tower is located in paris",
           "paris , capital of france", "what meaning", "i will summarize the message"]


def _jsonl(prompts):
    return "".join(json.dumps({"prompt": p, "topic": "pets" if "cat" in p or "dog" in p else "other"}) + "\n"
                   for p in prompts).encode()


def own_redis_db(redis_url: str, db: int = 13) -> str:
    """A Redis database no worker listens on (worker tests elsewhere use the shared one), so queued messages stay."""
    return redis_url.rsplit("/", 1)[0] + f"/{db}"


@pytest.fixture
def stack(database_url, redis_url):
    prepare_database(database_url)
    redis_url = own_redis_db(redis_url)
    settings = settings_for(database_url, redis_url, max_prompts_per_job=4)
    r = redis.Redis.from_url(redis_url)
    r.flushdb()
    with live_server(settings) as server:
        yield server, settings, r


def _control_messages(r):
    out = []
    for key in r.keys(CONTROL_QUEUE + "*"):
        if r.type(key) == b"list":
            out += [json.loads(m) for m in r.lrange(key, 0, -1)]
    return out


def test_audit_end_to_end_over_http(stack):
    server, settings, r = stack
    http = server.client()

    # streamed uploads: JSONL and CSV, and a clear error with the line number
    res = http.post("/v1/prompt-sets", files={"file": ("pets.jsonl", _jsonl(PROMPTS), "application/x-ndjson")},
                    data={"name": "pets", "description": "animals"})
    assert res.status_code == 201, res.text
    assert res.json()["size"] == len(PROMPTS)
    res = http.post("/v1/prompt-sets", files={"file": ("p.csv", b"id,prompt\n1,hello there\n2,\"a, b\"\n", "text/csv")},
                    data={"name": "small-csv"})
    assert res.status_code == 201 and res.json()["size"] == 2
    res = http.post("/v1/prompt-sets", files={"file": ("bad.jsonl", b'{"prompt": "ok"}\n{oops\n', "text/plain")},
                    data={"name": "bad"})
    assert res.status_code == 422 and "line 2" in res.json()["detail"]
    assert http.post("/v1/prompt-sets", files={"file": ("pets.jsonl", _jsonl(PROMPTS), "text/plain")},
                     data={"name": "pets"}).status_code == 409
    sets = http.get("/v1/prompt-sets").json()
    assert {p["name"] for p in sets["prompt_sets"]} == {"pets", "small-csv"} and "prompt_injections" in sets["builtin"]
    pets_id = next(p["id"] for p in sets["prompt_sets"] if p["name"] == "pets")
    items = http.get(f"/v1/prompt-sets/{pets_id}/items", params={"limit": 2}).json()
    assert [i["text"] for i in items["items"]] == PROMPTS[:2] and items["items"][0]["meta"] == {"topic": "pets"}

    # define an audit; bad configs are refused with a clear message
    body = {"name": "pets-audit", "model": "tiny", "prompt_set": "pets",
            "targets": {"layers": [0, 2, 4], "tokens": {"last": 2}},
            "options": {"template": "summarize", "max_new_tokens": 3},
            "detectors": [{"kind": "keywords", "name": "animals", "words": ["cat", "dog"], "min_relevancy": 0.1}]}
    bad = dict(body, detectors=[{"kind": "regex", "patterns": ["(oops"]}])
    assert http.post("/v1/audits", json=bad).status_code == 422
    assert http.post("/v1/audits", json=dict(body, schedule="whenever")).status_code == 422
    res = http.post("/v1/audits", json=body)
    assert res.status_code == 201, res.text
    audit = res.json()
    assert http.post("/v1/audits", json=body).status_code == 409

    # start a run: 202, and the fan-out message waits on the control queue (JSON, ids only)
    res = http.post(f"/v1/audits/{audit['id']}/runs")
    assert res.status_code == 202, res.text
    run = res.json()
    assert run["state"] == "pending"
    messages = [m for m in _control_messages(r) if m["headers"]["task"] == RUN_AUDIT_TASK]
    assert len(messages) == 1 and messages[0]["content-type"] == "application/json"
    assert http.post(f"/v1/audits/{audit['id']}/runs").json()["id"] == run["id"]  # no overlapping runs

    # what the worker does for that message, then the engine's results, then the beat tick
    producer = make_producer(settings.redis_url)
    sessions = server.app.state.sessionmaker
    out = W.run_audit(sessions, settings, producer, audit["id"], run["id"])
    assert out["state"] == "running" and out["jobs"] == 2
    progress = http.get(f"/v1/audit-runs/{run['id']}").json()["progress"]
    assert progress["prompts_submitted"] == len(PROMPTS) and progress["interpretations_total"] == len(PROMPTS) * 6
    jobs = http.get(f"/v1/audit-runs/{run['id']}/jobs").json()["jobs"]
    assert [j["prompt_offset"] for j in jobs] == [0, 4]

    run_all_chunks(sessions, lambda job, p, layer, tok: ({0: "nothing here", 2: "a cat", 4: "a dog"}[layer], 0.3))
    tick = W.audit_tick(sessions, settings, producer)
    assert tick["scanned"] == 2
    status = http.get(f"/v1/audit-runs/{run['id']}").json()
    assert status["state"] == "succeeded" and status["progress"]["fraction"] == 1.0

    report = http.get(f"/v1/audit-runs/{run['id']}/report", params={"top": 3}).json()
    assert {b["key"]: b["flags"] for b in report["by_layer"]} == {2: 12, 4: 12}
    assert {b["key"] for b in report["by_token_from_end"]} == {-2, -1}
    assert len(report["top"]) == 3 and report["top"][0]["prompt"] in PROMPTS
    assert report["diff"]["previous_run_id"] is None

    res = http.get(f"/v1/audit-runs/{run['id']}/findings", params={"format": "csv"})
    assert res.status_code == 200 and res.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(res.text)))
    assert len(rows) == 24 and {r["label"] for r in rows} == {"cat", "dog"}
    page = http.get(f"/v1/audit-runs/{run['id']}/findings", params={"limit": 10, "layer": 4}).json()
    assert len(page["items"]) == 10 and page["next_after"] and {f["layer"] for f in page["items"]} == {4}

    # findings of one job, for its grid page
    found = http.get(f"/v1/jobs/{jobs[0]['job_id']}/findings", params={"prompt": 0}).json()
    assert found["run_id"] == run["id"] and {(f["layer"], f["label"]) for f in found["items"]} == {(2, "cat"), (4, "dog")}
    assert http.get("/v1/jobs/" + "0" * 32 + "/findings").status_code == 404

    # a second run where the dog is gone: the diff says so
    run2 = http.post(f"/v1/audits/{audit['id']}/runs").json()
    W.run_audit(sessions, settings, producer, audit["id"], run2["id"])
    run_all_chunks(sessions, lambda job, p, layer, tok: ("a cat" if layer == 2 else "nothing", 0.3))
    W.audit_tick(sessions, settings, producer)
    diff = http.get(f"/v1/audit-runs/{run2['id']}/report").json()["diff"]
    assert diff["previous_run_id"] == run["id"] and diff["new_count"] == 0 and diff["gone_count"] == 12
    runs = http.get(f"/v1/audits/{audit['id']}/runs").json()["runs"]
    assert [x["id"] for x in runs] == [run2["id"], run["id"]]

    # schedule it; PATCH computes the next fire time
    patched = http.patch(f"/v1/audits/{audit['id']}", json={"schedule": "0 3 * * *"}).json()
    assert patched["schedule"] == "0 3 * * *" and patched["next_run_at"]

    # /metrics: Prometheus text with the figures the spec asks for
    text = http.get("/metrics").text
    for name in ("selfie_queue_depth{model=\"tiny\"}", "selfie_jobs{state=\"succeeded\"} 4.0",
                 "selfie_interpretations_total", "selfie_interpretations_per_second", "selfie_chunk_latency_seconds",
                 "selfie_audit_runs{state=\"succeeded\"} 2.0", "selfie_redis_up 1.0", "selfie_database_up 1.0"):
        assert name in text, name

    # the pages are served, and they only call the API
    for path in ("/ui", f"/ui/audits/{audit['id']}", f"/ui/jobs/{jobs[0]['job_id']}", "/ui/static/job.js",
                 "/ui/static/audit.js", "/ui/static/common.js", "/ui/static/selfie.css"):
        res = http.get(path)
        assert res.status_code == 200, path
        body = res.text.replace("http://www.w3.org/2000/svg", "")  # the SVG namespace is a name, not a fetch
        assert "http://" not in body and "https://" not in body, path


@pytest.fixture
def two_keys(database_url, redis_url):
    """A live server with auth on: (server, settings, alice's client, bob's client)."""
    from selfie_jobs.auth import create_key
    from selfie_jobs.db import session_scope

    prepare_database(database_url)
    settings = settings_for(database_url, redis_url, auth_enabled=True)
    with session_scope(database_url) as s:
        _, alice = create_key(s, "alice")
        _, bob = create_key(s, "bob")
    with live_server(settings) as server:
        yield server, settings, server.client(alice), server.client(bob)


def test_cancel_run_and_auth_scoping(two_keys, redis_url):
    server, settings, a, b = two_keys
    assert server.client().get("/v1/audits").status_code == 401
    res = a.post("/v1/audits", json={"name": "inj", "model": "tiny", "prompt_set": "prompt_injections",
                                     "detectors": [{"kind": "keywords", "words": ["password"]}]})
    assert res.status_code == 201, res.text
    audit_id = res.json()["id"]
    assert b.get(f"/v1/audits/{audit_id}").status_code == 404
    assert b.get("/v1/audits").json()["audits"] == []
    run = a.post(f"/v1/audits/{audit_id}/runs").json()
    W.run_audit(server.app.state.sessionmaker, settings, make_producer(redis_url), audit_id, run["id"])
    assert b.post(f"/v1/audit-runs/{run['id']}/cancel").status_code == 404
    res = a.post(f"/v1/audit-runs/{run['id']}/cancel").json()
    assert res["state"] == "cancelled"
    jobs = a.get(f"/v1/audit-runs/{run['id']}/jobs").json()["jobs"]
    assert jobs and all(a.get(f"/v1/jobs/{j['job_id']}").json()["state"] == "cancelled" for j in jobs)


def test_another_keys_prompt_set_reads_as_missing(two_keys):
    """An audit over another key's set would show its prompts through the jobs it fans out: refused as a missing set."""
    _, _, a, b = two_keys
    res = a.post("/v1/prompt-sets", files={"file": ("secret.jsonl", _jsonl(PROMPTS), "text/plain")},
                 data={"name": "alice-secret"})
    assert res.status_code == 201, res.text
    secret_id = res.json()["id"]
    audit = {"model": "tiny", "detectors": [{"kind": "keywords", "words": ["cat"]}]}

    for ref, missing in (("alice-secret", "no-such-set"), (str(secret_id), "999999")):
        refused = b.post("/v1/audits", json=dict(audit, name="bob-audit", prompt_set=ref))
        absent = b.post("/v1/audits", json=dict(audit, name="bob-audit", prompt_set=missing))
        assert refused.status_code == absent.status_code == 404, refused.text
        assert refused.json()["detail"] == absent.json()["detail"].replace(repr(missing), repr(ref))
    assert b.get("/v1/audits").json()["audits"] == []
    assert b.get(f"/v1/prompt-sets/{secret_id}/items").status_code == 404

    # the owner and the built-ins still work; an upload cannot take a built-in's name
    assert a.post("/v1/audits", json=dict(audit, name="alice-audit", prompt_set="alice-secret")).status_code == 201
    assert b.post("/v1/audits", json=dict(audit, name="bob-audit", prompt_set="prompt_injections")).status_code == 201
    res = a.post("/v1/prompt-sets", files={"file": ("x.jsonl", _jsonl(PROMPTS), "text/plain")},
                 data={"name": "ethical_decisions"})
    assert res.status_code == 409 and "built-in" in res.json()["detail"]


AUDIT = {"model": "tiny", "prompt_set": "ethical_decisions", "detectors": [{"kind": "keywords", "words": ["cat"]}]}
# The tiny card: hidden states 0..4, blocks 0..3 (k), 48 tokens of context; the test settings cap max_new_tokens at 32.
OUT_OF_CARD = [
    {"targets": {"layers": [5]}}, {"targets": {"layers": [-6]}}, {"targets": {"layers": {"start": 9}}},
    {"targets": {"tokens": [48]}}, {"targets": {"tokens": [-49]}}, {"targets": {"tokens": {"last": 49}}},
    {"options": {"k": 4}}, {"options": {"max_new_tokens": 33}}, {"options": {"template": "no-such-preset"}},
    {"options": {"template": {"parts": ["sure", 0, "x"]}, "max_new_tokens": 32, "k": 3}, "model": "no-such-model"},
]


def test_audit_targets_and_options_are_checked_against_the_model_card(two_keys):
    """What the fan-out would refuse for every prompt is refused when the audit is defined or changed (422)."""
    _, _, a, _ = two_keys
    for bad in OUT_OF_CARD:
        res = a.post("/v1/audits", json={**AUDIT, "name": "bad", **bad})
        assert res.status_code == 422, (bad, res.text)
    res = a.post("/v1/audits", json={**AUDIT, "name": "ok", "targets": {"layers": [4, -5], "tokens": [47, -48]},
                                     "options": {"k": 3, "max_new_tokens": 32}})
    assert res.status_code == 201, res.text
    audit = res.json()
    for bad in OUT_OF_CARD[:-1]:
        res = a.patch(f"/v1/audits/{audit['id']}", json=bad)
        assert res.status_code == 422, (bad, res.text)
    after = a.get(f"/v1/audits/{audit['id']}").json()
    assert (after["targets"], after["options"]) == (audit["targets"], audit["options"])
    assert a.get("/v1/audits").json()["audits"] == [after]


def test_a_fan_out_error_fails_the_run_with_its_reason_and_frees_the_audit(two_keys, database_url, redis_url):
    """An audit whose targets the model does not have (stored before they were checked, or a card that changed):
    its run fails with the reason stored, instead of staying `submitting` for ever, and a later run can start."""
    from selfie_jobs.audit_models import Audit
    from selfie_jobs.db import session_scope

    server, settings, a, _ = two_keys
    audit = a.post("/v1/audits", json={**AUDIT, "name": "shrunk"}).json()
    with session_scope(database_url) as s:
        s.get(Audit, audit["id"]).targets = {"layers": [99], "tokens": {"last": 1}}
    run = a.post(f"/v1/audits/{audit['id']}/runs").json()
    out = W.run_audit(server.app.state.sessionmaker, settings, make_producer(redis_url), audit["id"], run["id"])
    assert out["state"] == "failed"
    failed = a.get(f"/v1/audit-runs/{run['id']}").json()
    assert failed["state"] == "failed" and "layer 99 is out of range" in failed["error"], failed
    assert failed["finished_at"] is not None
    again = a.post(f"/v1/audits/{audit['id']}/runs")
    assert again.status_code == 202 and again.json()["id"] != run["id"] and again.json()["state"] == "pending"


class _Sent:
    def __init__(self):
        self.tasks = []

    def send_task(self, name, args=None, kwargs=None, **options):
        self.tasks.append((name, args, kwargs))


def test_a_revoked_keys_schedules_stop_and_never_fire(two_keys, database_url):
    """`selfie keys revoke` stops the key's schedules and says so; a tick never starts a run for a revoked key, even
    for an audit whose row still says it is due (stored before revoking stopped schedules)."""
    import os
    import subprocess
    import sys
    from datetime import timedelta

    from sqlalchemy import select

    from selfie_jobs.audit_models import Audit, AuditRun
    from selfie_jobs.db import session_scope
    from selfie_jobs.models import ApiKey, utcnow

    server, settings, a, b = two_keys
    for who, name in ((a, "alice-nightly"), (b, "bob-nightly")):
        assert who.post("/v1/audits", json={**AUDIT, "name": name, "schedule": "* * * * *"}).status_code == 201
    with session_scope(database_url) as s:
        alice = s.scalar(select(ApiKey.id).where(ApiKey.name == "alice"))
    env = {**os.environ, "SELFIE_DATABASE_URL": database_url}
    out = subprocess.run([sys.executable, "-m", "selfie_cli", "keys", "revoke", str(alice)], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"key {alice} revoked; schedules stopped: 1 audit(s)" in out.stdout, out.stdout
    with session_scope(database_url) as s:
        mine = s.scalars(select(Audit).where(Audit.owner_key_id == alice)).one()
        assert not mine.enabled and mine.next_run_at is None
        # as a row written before revoking stopped schedules (or revoked by hand): still enabled and due
        mine.enabled = True
        for audit in s.scalars(select(Audit)):
            audit.next_run_at = utcnow() - timedelta(minutes=1)
    sent = _Sent()
    tick = W.audit_tick(server.app.state.sessionmaker, settings, sent)
    with session_scope(database_url) as s:
        runs = {s.get(Audit, r.audit_id).name for r in s.scalars(select(AuditRun))}
    assert runs == {"bob-nightly"} and len(tick["started"]) == 1, (runs, tick)
    assert all(kwargs["run_id"] in tick["started"] for _, _, kwargs in sent.tasks)


def test_names_are_unique_per_key_not_across_keys(two_keys, database_url):
    """A name another key uses is free (a 409 would tell that it exists); each key resolves its own set by name;
    an admin sees who owns what."""
    from selfie_jobs.auth import create_key
    from selfie_jobs.db import session_scope

    server, _, a, b = two_keys
    audit = {"model": "tiny", "detectors": [{"kind": "keywords", "words": ["cat"]}], "name": "nightly"}
    sets = {}
    for who, prompts in ((a, PROMPTS[:2]), (b, PROMPTS[2:])):
        res = who.post("/v1/prompt-sets", files={"file": ("p.jsonl", _jsonl(prompts), "text/plain")},
                       data={"name": "pets"})
        assert res.status_code == 201, res.text
        sets[who] = res.json()["id"]
        res = who.post("/v1/audits", json=dict(audit, prompt_set="pets"))
        assert res.status_code == 201, res.text
        assert res.json()["prompt_set_id"] == sets[who]  # its own 'pets', not the other key's
    assert sets[a] != sets[b]
    # one key still cannot use a name twice
    assert a.post("/v1/prompt-sets", files={"file": ("p.jsonl", _jsonl(PROMPTS), "text/plain")},
                  data={"name": "pets"}).status_code == 409
    assert a.post("/v1/audits", json=dict(audit, prompt_set="pets")).status_code == 409
    with session_scope(database_url) as s:
        _, admin = create_key(s, "root", admin=True)
    owners = {p["id"]: p["owner_key_id"] for p in server.client(admin).get("/v1/prompt-sets").json()["prompt_sets"]}
    assert owners[sets[a]] != owners[sets[b]] and None not in (owners[sets[a]], owners[sets[b]])
    audits = server.client(admin).get("/v1/audits").json()["audits"]
    assert sorted(x["owner_key_id"] for x in audits) == sorted([owners[sets[a]], owners[sets[b]]])


def test_concurrent_requests_for_one_name_get_the_conflict_answer(stack):
    """The second of two requests for one name passes the name check before the first commits, then hits the unique
    index: it gets the 409 the check gives, not a 500."""
    from sqlalchemy.orm import Session

    from selfie_jobs.audit_models import Audit, PromptSet
    from selfie_jobs.db import create_db_engine, get_engine
    from tests.locksupport import LockStep

    server, settings, _ = stack
    http = server.client()
    pets = http.post("/v1/prompt-sets", files={"file": ("pets.jsonl", _jsonl(PROMPTS), "text/plain")},
                     data={"name": "pets"}).json()
    own = create_db_engine(settings.database_url)
    server_engine = get_engine(settings.resolved_database_url())
    upload = {"files": {"file": ("dup.jsonl", _jsonl(PROMPTS), "text/plain")}, "data": {"name": "dup"}}
    audit = {"name": "dup-audit", "model": "tiny", "prompt_set": "pets",
             "detectors": [{"kind": "keywords", "words": ["cat"]}]}
    cases = [
        (PromptSet(name="dup", source="upload", size=0), lambda: http.post("/v1/prompt-sets", **upload),
         "a prompt set named 'dup' already exists"),
        (Audit(name="dup-audit", model="tiny", prompt_set_id=pets["id"], targets={}, detectors=[]),
         lambda: http.post("/v1/audits", json=audit), "an audit named 'dup-audit' already exists"),
    ]
    try:
        for row, request, detail in cases:
            with Session(own) as first:
                first.add(row)
                first.flush()  # holds the name, not committed yet
                second = LockStep(server_engine, request).start()
                first.commit()
            res = second.join()
            assert res.status_code == 409, res.text
            assert res.json()["detail"] == detail
            assert request().json()["detail"] == detail  # what the check itself answers
    finally:
        own.dispose()


def test_concurrent_first_uses_of_a_built_in_set_both_get_their_audit(stack):
    """Built-in prompt sets are stored on first use: an audit whose request finds the set missing, then meets the
    row a concurrent request stored, is created over that row instead of failing on the unique name."""
    from sqlalchemy import func, select
    from sqlalchemy.orm import Session

    from selfie_jobs.audit_models import PromptSet
    from selfie_jobs.db import create_db_engine, get_engine
    from selfie_jobs.prompt_sets import ensure_builtin
    from tests.locksupport import LockStep

    server, settings, _ = stack
    http = server.client()
    own = create_db_engine(settings.database_url)
    audit = {"name": "first-use", "model": "tiny", "prompt_set": "harmful_knowledge",
             "detectors": [{"kind": "keywords", "words": ["poison"]}]}
    try:
        with Session(own) as first:
            stored = ensure_builtin(first, "harmful_knowledge")  # not committed yet
            second = LockStep(get_engine(settings.resolved_database_url()),
                              lambda: http.post("/v1/audits", json=audit)).start()
            first.commit()
            stored_id = stored.id
        res = second.join()
        assert res.status_code == 201, res.text
        assert res.json()["prompt_set_id"] == stored_id
        with Session(own) as check:
            assert check.scalar(select(func.count()).select_from(PromptSet)
                                .where(PromptSet.name == "harmful_knowledge")) == 1
    finally:
        own.dispose()
