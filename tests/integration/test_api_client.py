"""The Python client and the `selfie` CLI against a live API (real HTTP, real Redis) with a real worker process
(a tiny random LLaMA) behind it; one worker, one API and one database serve the whole module."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from selfie_client import Client, SelfieError, layer_token_table
from selfie_client.client import RESULT_COLUMNS
from selfie_jobs.db import get_engine
from tests.apisupport import live_server, prepare_database, settings_for, tiny_card
from tests.integration.worker_support import (
    MODEL,
    NUM_LAYERS,
    WorkerProcess,
    save_tiny_model,
    wait_worker_ready,
    worker_env,
)

ROOT = Path(__file__).resolve().parents[2]
IDLE = "idle"  # a model with a card but no worker: its jobs stay queued
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Private Redis (no other session's worker takes these messages), a migrated SQLite file, one worker, one API."""
    from workers.embedded import start_embedded_redis

    root = tmp_path_factory.mktemp("client-stack")
    database_url = f"sqlite:///{root / 'selfie.db'}"
    prepare_database(database_url, model=IDLE, card=tiny_card(name=IDLE))
    model_dir = save_tiny_model(root / MODEL)
    with start_embedded_redis(root / "redis") as redis_server:
        env = worker_env(database_url, redis_server.url, root / "worker")
        worker = WorkerProcess("clientw", model_dir, env, root, batch_size=16, extra=("--threads", "2"))
        try:
            settings = settings_for(database_url, redis_server.url, default_model=MODEL, worker_alive_seconds=6,
                                    max_new_tokens_cap=64)
            with live_server(settings) as srv, Client(srv.url) as client:
                wait_worker_ready(worker, client)
                srv.database_url, srv.worker = database_url, worker
                yield srv
        finally:
            worker.stop()
            get_engine.cache_clear()


def _label(index: int, token: str) -> str:
    return f"{index}:{token}"


def test_interpret_returns_a_dataframe(stack):
    prompts = ["a cat sat", "the dog ran"]
    with Client(stack.url) as client:
        tokens = [client.tokenize(p, MODEL) for p in prompts]
        df = client.interpret(prompts, layers=range(0, NUM_LAYERS + 1, 2), tokens=[-1, 1], max_new_tokens=3,
                              progress=False, timeout=120, poll=0.1)
    assert len(df) == 2 * 2 * 2  # prompts x layers {0, 2} x tokens
    # the engine's shape (selfie_core.to_dataframe), then the service's own columns
    assert list(df.columns) == RESULT_COLUMNS + ["worker", "model", "created_at"]
    assert df["label"].isna().all() and str(df["layer"].dtype) == "Int64"
    assert df.attrs["state"] == "succeeded" and df.attrs["link"].endswith(df.attrs["job_id"])
    assert df[["prompt_index", "layer", "token"]].duplicated().sum() == 0
    last = len(tokens[1]) - 1
    row = df[(df.prompt_index == 1) & (df.layer == NUM_LAYERS) & (df.token == last)].iloc[0]
    assert row["source_token"] == tokens[1][last] and row["prompt"] == "the dog ran"
    assert isinstance(row["text"], str) and len(row["relevancy"]) == len(row["token_ids"]) > 0
    table = layer_token_table(df, 0)
    assert list(table.index) == [0, 2]

    from selfie_jobs.db import session_scope
    from selfie_jobs.models import Worker

    with session_scope(stack.database_url) as session:
        infos = [w.info for w in session.query(Worker).filter(Worker.model == MODEL)]
    assert [info["threads"] for info in infos] == [2]  # the worker's `--threads 2`, in its heartbeat
    assert list(table.columns) == [_label(1, tokens[0][1]), _label(len(tokens[0]) - 1, tokens[0][-1])]
    cell = df[(df.prompt_index == 0) & (df.layer == 2) & (df.token == 1)].iloc[0]["text"]
    assert table.loc[2, _label(1, tokens[0][1])] in (cell, "(blank)")


def test_client_submit_status_results_cancel_and_errors(stack):
    with Client(stack.url) as client:
        # a job for a model no worker serves stays queued
        accepted = client.submit("a cat sat on the mat", layers="0:2", tokens="-2:", model=IDLE, priority=9)
        assert accepted["total"] == 4
        # a generated idempotency key makes a retried submit safe; an explicit one returns the same job
        again = client.submit("x", idempotency_key="fixed", max_new_tokens=3)
        assert client.submit("x", idempotency_key="fixed", max_new_tokens=3)["id"] == again["id"]
        with pytest.raises(SelfieError) as conflict:
            client.submit("y", idempotency_key="fixed", max_new_tokens=3)
        assert conflict.value.status == 409 and conflict.value.field == "idempotency_key"
        status = client.status(accepted["id"])
        assert status["state"] == "queued" and status["prompts"][0]["tokens"][-1] == "mat"
        assert client.tokenize("a cat", IDLE) == ["<s>", "a", "cat"]
        assert [m["name"] for m in client.models()] == [MODEL]  # only models with a live worker
        with pytest.raises(SelfieError) as info:
            client.submit("a cat", layers=[NUM_LAYERS + 3])
        assert info.value.status == 422 and info.value.field == "targets.layers"
        assert client.cancel(accepted["id"])["cancelled"] is True
        assert client.status(accepted["id"])["state"] == "cancelled"
        assert {accepted["id"], again["id"]} <= {j["id"] for j in client.jobs(limit=500)}
        final = client.wait(again["id"], progress=False, timeout=120, poll=0.1)
        assert final["state"] == "succeeded"
        tokens = client.tokenize("x", MODEL)
        assert final["progress"]["total"] == (NUM_LAYERS + 1) * len(tokens)
        rows = list(csv.DictReader(io.StringIO(client.results_csv(again["id"]))))
        assert len(rows) == final["progress"]["total"]
        assert all(r["worker"].startswith("clientw@") for r in rows)
        assert len(client.results(again["id"], layer_min=2)) == 1 * len(tokens)


class CountingTransport(httpx.HTTPTransport):
    """Real HTTP that counts the requests sent."""

    def __init__(self) -> None:
        super().__init__()
        self.sent = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.sent += 1
        return super().handle_request(request)


@pytest.fixture
def api_only(tmp_path, redis_url):
    """An API with auth on and no worker (its jobs stay queued); a key allowed 1 interpretation a day, and one not."""
    from selfie_jobs.auth import create_key
    from selfie_jobs.db import session_scope

    database_url = f"sqlite:///{tmp_path / 'selfie.db'}"
    prepare_database(database_url, model=IDLE, card=tiny_card(name=IDLE))
    with session_scope(database_url) as s:
        _, small = create_key(s, "small", daily_quota=1)
        _, big = create_key(s, "big")
    with live_server(settings_for(database_url, redis_url, auth_enabled=True)) as srv:
        srv.small_key, srv.big_key = small, big
        yield srv


def test_a_refusal_that_asks_to_wait_longer_than_the_client_would_is_raised_at_once(api_only):
    transport = CountingTransport()
    with Client(api_only.url, api_only.small_key, retries=1, transport=transport) as client:
        client.submit("a cat", model=IDLE, layers=[0], tokens=[-1])
        with pytest.raises(SelfieError) as refused:
            client.submit("a cat", model=IDLE, layers=[0], tokens=[-1])
    assert refused.value.status == 429 and "daily quota exceeded" in refused.value.detail
    assert transport.sent == 2  # the quota's Retry-After is an hour: not tried again


def test_interpret_raises_for_a_cancelled_job(api_only):
    options = {"model": IDLE, "layers": [0, 1], "tokens": [-1], "idempotency_key": "cancel-me"}
    with Client(api_only.url, api_only.big_key) as client:
        job = client.submit("a cat", **options)
        client.cancel(job["id"])
        # the same request with the same key is the cancelled job again
        with pytest.raises(SelfieError) as info:
            client.interpret("a cat", progress=False, timeout=30, poll=0.1, **options)
    assert info.value.status == 409
    assert f"job {job['id']} was cancelled (cancelled by request)" in str(info.value)


def _cli(*args: str, env_extra: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "selfie_cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_cli_submit_status_results_cancel(stack):
    url = ["--url", stack.url]
    with Client(stack.url) as client:
        tokens = client.tokenize("a cat sat", MODEL)
    last = len(tokens) - 1
    out = _cli("submit", "a cat sat", "--layers", "0,2", "--tokens", "-1", "--max-new-tokens", "3", "--wait", *url,
               timeout=120)
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.split()[1].rstrip(":")
    assert f"/v1/jobs/{job_id}" in out.stdout and "succeeded" in out.stdout
    assert f"explore: {stack.url}/ui/jobs/{job_id}" in out.stdout  # the page a person opens, not only the JSON
    assert _label(last, tokens[last]) in out.stdout
    status = _cli("status", job_id, *url)
    assert status.returncode == 0 and "succeeded" in status.stdout and "2/2" in status.stdout
    table = _cli("results", job_id, *url)
    assert _label(last, tokens[last]) in table.stdout
    as_csv = _cli("results", job_id, "--format", "csv", "--layer-min", "1", *url)
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert [(r["layer"], r["token"]) for r in rows] == [("2", str(last))]
    assert rows[0]["source_token"] == tokens[last] and rows[0]["worker"].startswith("clientw@")
    bad = _cli("submit", "a cat", "--layers", "99", *url)
    assert bad.returncode != 0 and "layer 99 is out of range" in bad.stderr
    assert "`selfie submit -h` lists the options" in bad.stderr, bad.stderr  # the command's own name
    queued = _cli("submit", "a cat", "--pair", "1,-1", "--model", IDLE, "--ttl", "2d", *url).stdout.split()[1]
    queued = queued.rstrip(":")
    with Client(stack.url) as client:
        assert client.status(queued)["ttl_seconds"] == 2 * 86400  # kept two days after it finishes
    bad_ttl = _cli("submit", "a cat", "--model", IDLE, "--ttl", "soon", *url)
    assert bad_ttl.returncode == 2 and "soon" in bad_ttl.stderr
    cancelled = _cli("cancel", queued, *url)
    assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout
    assert _cli("status", "0" * 32, *url).returncode != 0


def test_cli_submit_vectors_from_files(stack, tmp_path):
    """selfie submit --vectors FILE: a .npy upload with labels, a .json of expressions, and a .pt refused with why."""
    import json

    import numpy as np

    url = ["--url", stack.url]
    hidden = next(m for m in Client(stack.url).models() if m["name"] == MODEL)["hidden_size"]
    vectors = np.linspace(-2, 2, 3 * hidden, dtype=np.float32).reshape(3, hidden)
    np.save(tmp_path / "v.npy", vectors)
    out = _cli("submit", "--vectors", str(tmp_path / "v.npy"), "--label", "low", "--label", "mid", "--label", "high",
               "--max-new-tokens", "3", "--wait", *url, timeout=120)
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.split()[1].rstrip(":")
    assert "3 vectors in 1 chunks" in out.stdout and "succeeded" in out.stdout
    assert all(label in out.stdout for label in ("low", "mid", "high"))
    rows = list(csv.DictReader(io.StringIO(_cli("results", job_id, "--format", "csv", *url).stdout)))
    assert [(r["vector_index"], r["label"]) for r in rows] == [("0", "low"), ("1", "mid"), ("2", "high")]
    assert float(rows[2]["norm"]) == pytest.approx(float(np.linalg.norm(vectors[2])), rel=1e-5)
    # the interpretation filters have nothing to filter in a vectors job: refused, not silently dropped
    filtered = _cli("results", job_id, "--min-relevancy", "0.5", "--search", "x", *url)
    assert filtered.returncode == 2 and filtered.stdout == "", filtered.stdout
    assert (f"--min-relevancy --search filter an interpret job's interpretations; job {job_id} is a vectors job: "
            "its rows have no filters") in " ".join(filtered.stderr.split()), filtered.stderr
    with Client(stack.url) as client, pytest.raises(SelfieError) as info:
        client.results(job_id)  # read /interpretations: an empty frame before, as if nothing were done yet
    assert info.value.status == 409 and f"its rows are at GET /v1/jobs/{job_id}/results" in str(info.value)

    spec = {"expressions": [{"terms": [{"coef": 1, "prompt": "a cat sat", "layer": 1, "token": -1},
                                       {"coef": -1, "prompt": "the dog ran", "layer": 1, "token": -1}]}],
            "labels": ["cat - dog"]}
    (tmp_path / "e.json").write_text(json.dumps(spec))
    out = _cli("submit", "--vectors", str(tmp_path / "e.json"), "--max-new-tokens", "3", "--wait", *url, timeout=120)
    assert out.returncode == 0 and "cat - dog" in out.stdout and "succeeded" in out.stdout, out.stdout + out.stderr

    (tmp_path / "v.pt").write_bytes(b"\x80\x04K\x01.")
    refused = _cli("submit", "--vectors", str(tmp_path / "v.pt"), *url)
    assert refused.returncode != 0 and "pickle" in refused.stderr and "415" in refused.stderr
    both = _cli("submit", "a cat", "--vectors", str(tmp_path / "v.npy"), *url)
    assert both.returncode != 0 and "one of them" in both.stderr


def test_cli_keys_and_migrate(tmp_path):
    env = {"SELFIE_DATABASE_URL": f"sqlite:///{tmp_path / 'keys.db'}", "SELFIE_DATA_DIR": str(tmp_path)}
    assert _cli("migrate", env_extra=env).returncode == 0
    made = _cli("keys", "create", "alice", "--admin", env_extra=env)
    assert made.returncode == 0, made.stderr
    secret = made.stdout.strip().splitlines()[-1]
    assert secret.startswith("sk-selfie-")
    listing = _cli("keys", "list", env_extra=env).stdout
    assert "alice" in listing and "admin" in listing and secret not in listing
    assert _cli("keys", "revoke", "1", env_extra=env).returncode == 0
    assert "alice" not in _cli("keys", "list", env_extra=env).stdout
    assert "alice" in _cli("keys", "list", "--all", env_extra=env).stdout
    assert _cli("keys", "revoke", "999", env_extra=env).returncode != 0


def test_cli_imports_nothing_heavy():
    code = ("import sys, selfie_cli.main, selfie_client; "
            "heavy = [m for m in ('torch', 'transformers', 'selfie_core', 'workers', 'pandas', 'sqlalchemy', 'fastapi',"
            " 'celery') if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.slow
def test_cli_interpret_runs_the_engine_in_process(tmp_path):
    from tests.integration.worker_support import NUM_LAYERS as TINY_LAYERS
    from tests.integration.worker_support import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "tiny")
    env = {"SELFIE_DATA_DIR": str(tmp_path / "data")}
    out = _cli("interpret", "The Eiffel Tower is located in Paris.", "--model-path", str(model_dir), "--layers",
               "all", "--tokens", "0,-1", "--max-new-tokens", "3", "--format", "csv", env_extra=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    assert len(rows) == (TINY_LAYERS + 1) * 2
    assert {r["prompt_index"] for r in rows} == {"0"} and {r["layer"] for r in rows} == {"0", "1", "2"}
    table = _cli("interpret", "The Eiffel Tower is located in Paris.", "--model-path", str(model_dir), "--pair", "1,-1",
                 "--max-new-tokens", "2", env_extra=env, timeout=300)
    assert table.returncode == 0 and "layer" in table.stdout
    bad = _cli("interpret", "Paris", "--model-path", str(model_dir), "--layers", "9", env_extra=env, timeout=300)
    assert bad.returncode != 0 and "layer 9 is out of range" in bad.stderr


def test_cli_lenses_and_search(stack):
    """selfie submit --lens: a lenses job, printed as each lens's top-1 per (layer, token), CSV in its columns;
    selfie search and Client.search: the interpretations whose text holds the words, newest first."""
    url = ["--url", stack.url]
    out = _cli("submit", "a cat sat", "--lens", "logit", "--lens", "identity", "--top-k", "2", "--layers", "0,2",
               "--tokens", "-1", "--wait", *url, timeout=120)
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.split()[1].rstrip(":")
    assert "2 lens readings in 1 chunks" in out.stdout and "succeeded" in out.stdout
    assert "identity" in out.stdout and "logit" in out.stdout
    rows = list(csv.DictReader(io.StringIO(_cli("results", job_id, "--format", "csv", *url).stdout)))
    assert [r["layer"] for r in rows] == ["0", "2"] and rows[1]["logit_matches"] == "true"
    bad = _cli("submit", "a cat", "--lens", "tuned", *url)
    assert bad.returncode == 2 and "tuned" in bad.stderr
    dropped = _cli("submit", "a cat", "--lens", "logit", "--max-new-tokens", "100", "--template", "describe", *url)
    assert dropped.returncode == 2 and "a --lens job generates nothing" in dropped.stderr, dropped.stderr
    assert "--max-new-tokens" in dropped.stderr and "--template" in dropped.stderr

    with Client(stack.url) as client:
        kept = client.submit_lenses("a cat", layers=[0], tokens=[-1], ttl_seconds=7200)
        assert client.status(kept["id"])["ttl_seconds"] == 7200  # a lenses job's time to live, as any job's
        done = client.interpret("a cat sat", layers=[1], tokens=[-1], max_new_tokens=8, progress=False, timeout=120)
        word = next(w for w in done.text[0].split() if any(ch.isalnum() for ch in w))
        found = client.search(word, job=done.attrs["job_id"])
    assert list(found.text) == [done.text[0]] and list(found.kind) == ["interpret"]
    listed = _cli("search", word, "--job", done.attrs["job_id"], "--format", "csv", *url)
    assert listed.returncode == 0, listed.stderr
    assert [r["job_id"] for r in csv.DictReader(io.StringIO(listed.stdout))] == [done.attrs["job_id"]]
    refused = _cli("search", "* -", *url)
    assert refused.returncode != 0 and "no words" in refused.stderr


def test_client_and_cli_edits_return_the_variant(stack):
    from click.testing import CliRunner

    from selfie_cli.main import cli
    from selfie_client import state_ref

    with Client(stack.url) as client:
        out = client.edit_reinforce("The Eiffel Tower is located in Paris.", 1, {"type": "keywords", "words": ["the"]},
                                    epochs=2, k=1, max_new_tokens=4, progress=False, timeout=120)
        assert out["variant"]["method"] == "reinforce" and [e["epoch"] for e in out["epochs"]] == [0, 1]
        assert out["variant"]["evaluations"]["objective"]["name"] == "bad_share"
        accepted = client.edit_supervised(state_ref("The quick brown fox", 2, -1), target_vector=[0.1] * 32,
                                          reference_texts=["a cat sat"], epochs=2, wait=False)
        assert accepted["kind"] == "supervised" and accepted["state"] == "queued"
        with pytest.raises(SelfieError, match="layer 0"):
            client.edit_supervised(state_ref("The quick brown fox", 0, -1), target_vector=[0.1] * 32, wait=False)
    result = CliRunner().invoke(cli, ["edit", "supervised", "--url", stack.url, "--prompt", "The quick brown fox",
                                      "--layer", "1", "--token", "-1", "--target-prompt", "A cat sat",
                                      "--target-layer", "2", "--target-token", "-1", "--epochs", "3"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "variant " in result.output and "epoch 2: loss" in result.output
    assert "source state's distance to the target: " in result.output and "/ui/variants/" in result.output
    refused = CliRunner().invoke(cli, ["edit", "reinforce", "--url", stack.url, "--prompt", "a cat", "--layer", "9", "--k", "1",
                                       "--keywords", "cat"])
    assert refused.exit_code != 0 and "layer 9" in refused.output
