"""The Python client and the `selfie` CLI against a live API (real HTTP, real Redis), with the worker's part
played on the database by `FakeWorker` (the real worker has its own integration tests)."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from selfie_client import Client, SelfieError, layer_token_table
from tests.apisupport import FakeWorker, NUM_LAYERS, flush_model_queue, live_server, prepare_database, settings_for

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def stack(sqlite_url, redis_url):
    model = "tiny-" + uuid.uuid4().hex[:8]
    prepare_database(sqlite_url, model=model)
    with live_server(settings_for(sqlite_url, redis_url, default_model=model)) as srv:
        srv.model, srv.database_url, srv.redis_url = model, sqlite_url, redis_url
        yield srv
    flush_model_queue(redis_url, model)


def test_interpret_returns_a_dataframe(stack):
    with FakeWorker(stack.database_url, stack.model), Client(stack.url) as client:
        df = client.interpret(["a cat sat", "the dog ran"], layers=range(0, NUM_LAYERS + 1, 2), tokens=[-1, 1],
                              model=stack.model, progress=False, timeout=60, poll=0.1)
    assert len(df) == 2 * 3 * 2
    assert df.attrs["state"] == "succeeded" and df.attrs["link"].endswith(df.attrs["job_id"])
    row = df[(df.prompt_index == 1) & (df.layer == 4) & (df.token == 3)].iloc[0]
    assert row["text"] == "p1 L4 t3 ran" and row["prompt"] == "the dog ran"
    table = layer_token_table(df, 0)
    assert list(table.index) == [0, 2, 4] and list(table.columns) == ["1:a", "3:sat"]
    assert table.loc[2, "3:sat"] == "p0 L2 t3 sat"


def test_client_submit_status_results_cancel_and_errors(stack):
    with Client(stack.url) as client:
        accepted = client.submit("a cat sat on the mat", layers="0:2", tokens="-2:", model=stack.model, priority=9)
        assert accepted["total"] == 4
        # a generated idempotency key makes a retried submit safe; an explicit one returns the same job
        again = client.submit("x", idempotency_key="fixed")
        assert client.submit("x", idempotency_key="fixed")["id"] == again["id"]
        status = client.status(accepted["id"])
        assert status["state"] == "queued" and status["prompts"][0]["tokens"][-1] == "mat"
        assert client.tokenize("a cat", stack.model) == ["<s>", "a", "cat"]
        assert [m["name"] for m in client.models()] == []
        with pytest.raises(SelfieError) as info:
            client.submit("a cat", layers=[NUM_LAYERS + 3])
        assert info.value.status == 422 and info.value.field == "targets.layers"
        assert client.cancel(accepted["id"])["cancelled"] is True
        assert client.status(accepted["id"])["state"] == "cancelled"
        assert {j["id"] for j in client.jobs()} == {accepted["id"], again["id"]}
        with FakeWorker(stack.database_url, stack.model):
            final = client.wait(again["id"], progress=False, timeout=30, poll=0.1)
        assert final["state"] == "succeeded"
        rows = list(csv.DictReader(io.StringIO(client.results_csv(again["id"]))))
        assert len(rows) == final["progress"]["total"]
        assert len(client.results(again["id"], layer_min=2)) == 3 * 2


def _cli(*args: str, env_extra: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "selfie_cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_cli_submit_status_results_cancel(stack):
    url = ["--url", stack.url]
    with FakeWorker(stack.database_url, stack.model):
        out = _cli("submit", "a cat sat", "--layers", "0,2", "--tokens", "-1", "--wait", *url)
        assert out.returncode == 0, out.stderr
        job_id = out.stdout.split()[1].rstrip(":")
        assert f"/v1/jobs/{job_id}" in out.stdout and "succeeded" in out.stdout and "p0 L2 t3 sat" in out.stdout
    status = _cli("status", job_id, *url)
    assert status.returncode == 0 and "succeeded" in status.stdout and "2/2" in status.stdout
    table = _cli("results", job_id, *url)
    assert "3:sat" in table.stdout and "p0 L0 t3 sat" in table.stdout
    as_csv = _cli("results", job_id, "--format", "csv", "--layer-min", "1", *url)
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert [(r["layer"], r["token"]) for r in rows] == [("2", "3")]
    bad = _cli("submit", "a cat", "--layers", "99", *url)
    assert bad.returncode != 0 and "layer 99 is out of range" in bad.stderr
    queued = _cli("submit", "a cat", "--pair", "1,-1", *url).stdout.split()[1].rstrip(":")
    cancelled = _cli("cancel", queued, *url)
    assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout
    assert _cli("status", "0" * 32, *url).returncode != 0


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
