"""The real `selfie` CLI (a subprocess) meets user errors: one or two lines saying what was wrong and what to do,
exit status 2 for a bad command line and 1 for a runtime error, never a traceback (unless `--debug`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from selfie_client import Client, ServiceUnreachable
from tests import services
from tests.apisupport import MODEL, live_server, prepare_database, settings_for

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(300)


def selfie(*args: str, timeout: float = 120, **extra_env: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("SELFIE_DEBUG", "SELFIE_URL", "SELFIE_API_KEY")}
    env.update(extra_env)
    return subprocess.run([sys.executable, "-m", "selfie_cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def assert_user_error(out: subprocess.CompletedProcess, status: int, *needles: str) -> list[str]:
    """Exit `status`, at most two lines on stderr (the error, then what to do), no traceback, each needle said."""
    lines = out.stderr.strip().splitlines()
    assert out.returncode == status, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr + out.stdout, out.stderr
    assert 1 <= len(lines) <= 2, out.stderr
    assert lines[0].startswith("error: "), lines
    for needle in needles:
        assert needle in out.stderr, (needle, out.stderr)
    return lines


@pytest.fixture(scope="module")
def api(tmp_path_factory, redis_url):
    """An API with a model card and no worker (its jobs stay queued)."""
    from selfie_jobs.db import get_engine

    database_url = f"sqlite:///{tmp_path_factory.mktemp('cli-errors') / 'selfie.db'}"
    prepare_database(database_url)
    try:
        with live_server(settings_for(database_url, redis_url, default_model=MODEL)) as srv:
            yield srv
    finally:
        get_engine.cache_clear()


def closed_port_url() -> str:
    return f"http://127.0.0.1:{services.free_port()}"


def test_an_unreachable_server_is_one_line_at_once():
    url = closed_port_url()
    out = selfie("submit", "a cat", "--url", url)
    assert_user_error(out, 1, f"cannot reach the SelfIE API at {url}", "selfie up")
    assert_user_error(selfie("status", "abc", "--url", url), 1, "cannot reach")


def test_the_client_does_not_retry_a_server_it_never_reached():
    sent = []

    class Counting(httpx.HTTPTransport):
        def handle_request(self, request):
            sent.append(request.url)
            return super().handle_request(request)

    with Client(closed_port_url(), retries=5, transport=Counting()) as client, pytest.raises(ServiceUnreachable):
        client.models()
    assert len(sent) == 1  # the old client tried 6 times over ~6 s before a 79-line traceback


@pytest.mark.parametrize("option, value", [("--tokens", "last3"), ("--layers", "abc"), ("--layers", "1:2:3:4"),
                                           ("--tokens", ",")])
def test_a_bad_selection_is_a_usage_error(option, value):
    # refused before any request: the URL points nowhere and is never tried
    lines = assert_user_error(selfie("submit", "a cat", option, value, "--url", closed_port_url()), 2, option,
                              '"0:31:5"')
    assert "--help" in lines[1]


def test_a_missing_model_folder_is_a_usage_error(tmp_path):
    assert_user_error(selfie("interpret", "a cat", "--model-path", str(tmp_path / "nowhere")), 2,
                      f"no model folder at {tmp_path / 'nowhere'}")


def test_refusals_of_the_server_are_one_line_with_what_to_do(api):
    bad = selfie("submit", "a cat", "--layers", "99", "--url", api.url)
    assert_user_error(bad, 1, "the server answered 422", "layer 99 is out of range", "change the request")
    missing = selfie("status", "0" * 32, "--url", api.url)
    assert_user_error(missing, 1, "the server answered 404")
    assert_user_error(selfie("cancel", "0" * 32, "--url", api.url), 1, "404")


def test_bad_file_paths(api, tmp_path):
    job = selfie("submit", "a cat", "--layers", "0", "--tokens", "-1", "--url", api.url)
    assert job.returncode == 0, job.stderr
    job_id = job.stdout.split()[1].rstrip(":")
    target = tmp_path / "no-such-dir" / "out.csv"
    out = selfie("results", job_id, "--format", "csv", "-o", str(target), "--url", api.url)
    assert_user_error(out, 1, "No such file or directory", str(target))
    assert_user_error(selfie("audit", "upload", str(tmp_path / "none.jsonl"), "--url", api.url), 2,
                      "none.jsonl")


def test_commands_that_raised_clicks_own_error_speak_in_the_one_form(api, tmp_path):
    # `keys revoke`, `selfie audit` and `selfie up` printed click's "Error: ..." instead of "error: ..."
    database_url = f"sqlite:///{tmp_path / 'selfie.db'}"
    prepare_database(database_url)
    assert_user_error(selfie("keys", "revoke", "nosuchkey", SELFIE_DATABASE_URL=database_url,
                             SELFIE_DATA_DIR=str(tmp_path)), 1, "no key 'nosuchkey'", "selfie keys list")
    assert_user_error(selfie("audit", "run", "no-such-audit", "--url", api.url), 1, "no audit named 'no-such-audit'")
    assert_user_error(selfie("audit", "export", "999999", "--url", api.url), 1, "the server answered 404")
    # refused before anything starts: no Redis, database or process is touched
    lines = assert_user_error(selfie("up", "--demo", "--no-worker", SELFIE_DATA_DIR=str(tmp_path / "up")), 2,
                              "--demo needs the worker")
    assert "--help" in lines[1] and not (tmp_path / "up").exists()


def test_debug_keeps_the_traceback():
    url = closed_port_url()
    out = selfie("--debug", "submit", "a cat", "--url", url)
    assert out.returncode == 1
    assert "Traceback" in out.stderr and "ServiceUnreachable" in out.stderr
