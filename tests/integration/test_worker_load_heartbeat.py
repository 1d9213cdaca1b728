"""A worker whose first load lasts longer than `worker_alive_seconds` (the GGUF conversion on a busy machine, a large
model) keeps beating while it loads, so a submit in the meantime gets the 503 "still loading" with Retry-After and
not the 422 "no model is served yet (start a worker)" of a model nobody serves. A real worker runtime loads the real
default model from an empty cache (first conversion: seconds) next to a real API over HTTP."""

from __future__ import annotations

import threading
import time

import pytest

from selfie_jobs.db import get_engine, get_sessionmaker, session_scope
from selfie_jobs.models import Worker
from selfie_jobs.settings import Settings
from tests.apisupport import flush_model_queue, live_server, prepare_database, settings_for
from tests.integration.worker_support import wait_for
from workers.runtime import Runtime, WorkerOptions

pytestmark = pytest.mark.timeout(600)
ALIVE_SECONDS = 1.0
BEAT_SECONDS = 0.2


def worker_state(database_url: str, runtime: Runtime) -> str | None:
    if runtime.identity is None:
        return None
    with session_scope(database_url) as session:
        row = session.get(Worker, runtime.name)
        return row.state if row is not None else None


def test_a_submit_during_a_load_longer_than_the_alive_window_is_told_to_retry(sqlite_url, redis_url, tmp_path):
    prepare_database(sqlite_url)
    model = Settings(_env_file=None).default_model
    flush_model_queue(redis_url, model)
    runtime = Runtime(settings=Settings(_env_file=None, database_url=sqlite_url, data_dir=tmp_path / "worker",
                                        heartbeat_interval_seconds=BEAT_SECONDS),
                      options=WorkerOptions(model=model, threads=1), sessions=get_sessionmaker(sqlite_url))
    failures: list[BaseException] = []

    def load() -> None:
        try:
            runtime.start()
        except BaseException as exc:  # noqa: BLE001 - re-raised by the test below
            failures.append(exc)

    body = {"model": model, "prompts": ["a cat sat"], "targets": {"layers": [0], "tokens": [-1]},
            "max_new_tokens": 2}
    loader = threading.Thread(target=load, daemon=True)
    try:
        with live_server(settings_for(sqlite_url, redis_url, worker_alive_seconds=ALIVE_SECONDS)) as server:
            http = server.client()
            loader.start()
            wait_for(lambda: worker_state(sqlite_url, runtime) == "loading", 120, what="the loading heartbeat")
            time.sleep(3 * ALIVE_SECONDS)  # well past the alive window since the load began
            res = http.post("/v1/jobs", json=body)
            assert runtime.engine is None, "the load finished too early for this test to show anything"
            assert res.status_code == 503, res.text
            assert "is still loading on worker" in res.json()["detail"]
            assert worker_state(sqlite_url, runtime) == "loading"

            loader.join(timeout=540)
            assert not failures, failures
            res = http.post("/v1/jobs", json=body)
            assert res.status_code == 202, res.text
            time.sleep(3 * BEAT_SECONDS)  # later beats keep saying ready
            assert worker_state(sqlite_url, runtime) == "ready"
    finally:
        loader.join(timeout=540)
        runtime.stop()
        flush_model_queue(redis_url, model)
        get_engine.cache_clear()
