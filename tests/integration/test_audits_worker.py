"""Audits on the real stack: uvicorn API, Redis, SQLite/PostgreSQL, a worker process serving a tiny random LLaMA
(it consumes its model queue and the control queue) and a beat process (the audit tick). Driven by the CLI.

Proves: a run fans out through the queue and finishes with no process of the test doing any of the work; the
CLI commands (upload, create, run --wait, report, export, schedule) work against it; a run whose worker is
killed with SIGKILL mid-run finishes once a new worker starts, with every prompt submitted exactly once.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys

import pytest
from click.testing import CliRunner

from selfie_cli.main import cli
from tests.apisupport import live_server, settings_for
from tests.integration.worker_support import MODEL, NUM_LAYERS, ROOT, WorkerProcess, save_tiny_model, wait_for, \
    worker_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

WORDS = "the cat sat on a mat while the dog ran to the park near paris".split()


class Beat:
    def __init__(self, env, tmp_path):
        self.log_path = tmp_path / "beat.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "workers", "beat", "--schedule",
                                      str(tmp_path / "beat-schedule")], cwd=ROOT, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self):
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._log.close()


@pytest.fixture
def stack(migrated_database_url, redis_url, tmp_path):
    import redis

    # A Redis database of its own: workers of other test runs on this machine listen on the shared one.
    redis_url = redis_url.rsplit("/", 1)[0] + "/14"
    redis.Redis.from_url(redis_url).flushdb()
    model_dir = save_tiny_model(tmp_path / "model")
    env = worker_env(migrated_database_url, redis_url, tmp_path / "data", SELFIE_MAX_PROMPTS_PER_JOB="8",
                     SELFIE_CHUNK_SIZE="8")
    settings = settings_for(migrated_database_url, redis_url, max_prompts_per_job=8, chunk_size=8)
    procs: list = []

    def start_worker(name):
        w = WorkerProcess(name, model_dir, env, tmp_path)
        procs.append(w)
        return w

    beat = Beat(env, tmp_path)
    try:
        with live_server(settings) as server:
            yield server, start_worker, tmp_path
    finally:
        beat.stop()
        for w in procs:
            w.stop()


def _ready(server, worker):
    def check():
        if worker.proc.poll() is not None:
            raise AssertionError(f"worker {worker.name} exited:\n{worker.log()[-3000:]}")
        models = server.client().get("/v1/models").json()["models"]
        return any(m["name"] == MODEL and any(w["state"] == "ready" and w["name"].startswith(worker.name)
                                              for w in m["workers"]) for m in models) and "ready." in worker.log()

    wait_for(check, 120, what=f"worker {worker.name}")


def _cli(server, *args):
    result = CliRunner().invoke(cli, ["audit", *args, "--url", server.url], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_cli_audit_on_the_real_stack(stack):
    server, start_worker, tmp = stack
    _ready(server, start_worker("aw1"))
    prompts = tmp / "prompts.csv"
    prompts.write_text("prompt,topic\n" + "".join(f"{' '.join(WORDS[i:i + 6])},t{i}\n" for i in range(10)))
    out = _cli(server, "upload", str(prompts), "--name", "words")
    assert "10 prompts" in out
    out = _cli(server, "create", "words-audit", "--prompt-set", "words", "--model", MODEL, "--layers", "all",
               "--tokens", "last:2", "--template", "summarize", "--max-new-tokens", "3",
               "--regex", r"\w{2,}", "--keywords", "cat,dog")
    assert "audit 1" in out
    out = _cli(server, "run", "words-audit", "--wait")
    assert "succeeded" in out, out
    report = json.loads(_cli(server, "report", "1", "--json"))
    assert report["state"] == "succeeded" and report["progress"]["interpretations_done"] == 10 * (NUM_LAYERS + 1) * 2
    assert {b["key"] for b in report["by_layer"]} <= set(range(NUM_LAYERS + 1))
    text = _cli(server, "report", "1")
    assert "flags per layer" in text and "top findings" in text
    export = tmp / "findings.csv"
    _cli(server, "export", "1", "-o", str(export))
    rows = list(csv.DictReader(io.StringIO(export.read_text())))
    assert len(rows) == report["flags"]
    assert "next run" in _cli(server, "schedule", "words-audit", "*/5 * * * *")
    assert "words-audit" in _cli(server, "list")


def test_run_survives_a_killed_worker(stack):
    server, start_worker, tmp = stack
    first = start_worker("aw1")
    _ready(server, first)
    http = server.client()
    lines = "".join(json.dumps({"prompt": " ".join(WORDS[i % 8:i % 8 + 5]) + f" {i}"}) + "\n" for i in range(120))
    res = http.post("/v1/prompt-sets", files={"file": ("many.jsonl", lines.encode())}, data={"name": "many"})
    assert res.status_code == 201, res.text
    res = http.post("/v1/audits", json={"name": "many", "model": MODEL, "prompt_set": "many",
                                        "targets": {"layers": "all", "tokens": {"last": 1}},
                                        "options": {"template": "summarize", "max_new_tokens": 8},
                                        "detectors": [{"kind": "regex", "patterns": [r"\w+"]}]})
    audit_id = res.json()["id"]
    run = http.post(f"/v1/audits/{audit_id}/runs").json()

    def some_progress():
        p = http.get(f"/v1/audit-runs/{run['id']}").json()["progress"]
        return p["jobs_total"] >= 1 and p["interpretations_done"] > 0

    wait_for(some_progress, 60, interval=0.05, what="the run to start")
    os.killpg(first.pid, signal.SIGKILL)  # the worker and its children, mid-run
    first.proc.wait(10)
    status = http.get(f"/v1/audit-runs/{run['id']}").json()
    assert status["state"] != "succeeded", "the run ended before the worker was killed; make it bigger"

    _ready(server, start_worker("aw2"))
    wait_for(lambda: http.get(f"/v1/audit-runs/{run['id']}").json()["state"] in ("succeeded", "failed"), 180,
             interval=0.5, what="the run to finish after the restart")
    status = http.get(f"/v1/audit-runs/{run['id']}").json()
    jobs = http.get(f"/v1/audit-runs/{run['id']}/jobs").json()["jobs"]
    errors = [http.get(f"/v1/jobs/{j['job_id']}").json()["error"] or "" for j in jobs]
    assert status["state"] == "succeeded", (status["error"], errors)
    p = status["progress"]
    assert p["prompts_submitted"] == p["prompts_total"] == 120
    assert p["interpretations_done"] == p["interpretations_total"] == 120 * (NUM_LAYERS + 1)
    jobs = http.get(f"/v1/audit-runs/{run['id']}/jobs").json()["jobs"]
    covered = sorted(i for j in jobs for i in range(j["prompt_offset"], j["prompt_offset"] + j["prompt_count"]))
    assert covered == list(range(120))  # each prompt in exactly one job
