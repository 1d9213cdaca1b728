"""Live status and preemptive cancel with a real worker process, over real HTTP, on SQLite and PostgreSQL.

The worker serves a random LLaMA wide enough (6 blocks of 256) that a batch of 1,000 new tokens decodes for tens of
seconds on this CPU, as a real model's batch does. While it decodes, the job reads `running`, its rows in flight,
the decode step and an ETA, through GET /v1/jobs/{id} and its event stream; a cancel stops the running batch within
CANCEL_BOUND seconds, and the rows of another job in the same batch are still written. A chunk whose message finds
nothing to do ends as IGNORED in Celery's events (what Flower shows), not as a success.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from selfie_client import Client
from selfie_jobs.db import get_engine, session_scope
from selfie_jobs.models import Chunk, EngineRun, Interpretation
from tests.apisupport import live_server, settings_for
from tests.integration.worker_support import MODEL, PROMPTS, WorkerProcess, save_tiny_model, wait_for, worker_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

#: Seconds from a cancel's answer to the cancelled job's batch letting go of its chunk. The worker polls for closed
#: jobs every busy heartbeat (1 s here) and the engine stops the rows at its next decode step; the bound leaves room
#: for a loaded 2-core machine. Without preemption the batch runs its ~30 s to the end first.
CANCEL_BOUND = 8.0
LAYERS = 7  # hidden_states 0..6 of the 6-block model
NEW_TOKENS = 1000


@pytest.fixture(scope="module")
def slow_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("models") / MODEL, layers=LAYERS - 1, hidden_size=256,
                           context=4096)


@pytest.fixture
def served(migrated_database_url, redis_url, tmp_path, slow_model_dir):
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    env = worker_env(migrated_database_url, redis_url, tmp_path / "w1", SELFIE_CHUNK_SIZE="64")
    worker = WorkerProcess("livew1", slow_model_dir, env, tmp_path, batch_size=64)
    try:
        settings = settings_for(migrated_database_url, redis_url, chunk_size=64, default_model=MODEL,
                                worker_alive_seconds=6, max_new_tokens_cap=NEW_TOKENS, event_poll_seconds=0.2)
        with live_server(settings) as server, Client(server.url) as client:
            def ready():
                if worker.proc.poll() is not None:
                    raise AssertionError(worker.log()[-4000:])
                return any(m["name"] == MODEL and any(w["state"] == "ready" for w in m["workers"])
                           for m in client.models())

            wait_for(ready, 180, what="worker ready")
            wait_for(lambda: "ready." in worker.log(), 30, what="worker consuming")
            yield client, server, migrated_database_url, worker
    finally:
        worker.stop()
        get_engine.cache_clear()


def _counts(database_url: str, job_id: str) -> tuple[int, dict[str, int]]:
    with session_scope(database_url) as s:
        rows = s.scalar(select(func.count()).select_from(Interpretation).where(Interpretation.job_id == job_id))
        states = dict(s.execute(select(Chunk.state, func.count()).where(Chunk.job_id == job_id)
                                .group_by(Chunk.state)).all())
    return rows, {str(k): v for k, v in states.items()}


def _decoding(client: Client, job_id: str, after_step: int = 0):
    status = client.status(job_id, include_prompts=False)
    return status if (status["progress"]["decode_step"] or 0) > after_step else None


def _first_events(url: str, job_id: str, n: int) -> list[tuple[str, dict]]:
    """The first `n` events of the job's stream (httpx-sse, as the client reads it)."""
    from httpx_sse import connect_sse

    out = []
    with httpx.Client(base_url=url, timeout=30) as http, connect_sse(http, "GET", f"/v1/jobs/{job_id}/events") as src:
        assert src.response.headers["content-type"].startswith("text/event-stream")
        for event in src.iter_sse():
            out.append((event.event, json.loads(event.data)))
            if len(out) == n:
                return out
    return out


def test_live_status_and_a_cancel_that_preempts_the_running_batch(served):
    client, server, database_url, worker = served
    blocker = client.submit([PROMPTS[0]], layers="all", tokens=list(range(6)), max_new_tokens=NEW_TOKENS)
    rows = LAYERS * 6

    # running as soon as its chunk is, with its rows in flight and an ETA, long before anything is stored
    first = wait_for(lambda: _decoding(client, blocker["id"]), 120, interval=0.2, what="the batch decoding")
    assert first["state"] == "running" and first["progress"]["done"] == 0
    assert first["progress"]["in_flight"] == rows and first["progress"]["decode_steps"] == NEW_TOKENS
    assert first["timings"]["started_at"] is not None and first["timings"]["running_seconds"] > 0
    later = wait_for(lambda: _decoding(client, blocker["id"], first["progress"]["decode_step"]), 30, interval=0.2,
                     what="the decode step to advance")
    assert later["progress"]["rows_per_second"] > 0 and later["progress"]["eta_seconds"] > 0
    assert later["timings"]["running_seconds"] > first["timings"]["running_seconds"]
    events = _first_events(server.url, blocker["id"], 2)
    assert [e for e, _ in events] == ["status", "status"]  # pushed again when the progress moves on
    assert all(s["state"] == "running" and s["progress"]["in_flight"] == rows for _, s in events)
    assert events[1][1]["progress"] != events[0][1]["progress"]
    assert events[1][1]["progress"]["decode_step"] >= events[0][1]["progress"]["decode_step"]

    # two jobs that wait behind it, to share one engine batch once it is gone
    gone = client.submit([PROMPTS[0]], layers="all", tokens=[0, 1, 2], max_new_tokens=NEW_TOKENS)
    kept = client.submit([PROMPTS[1]], layers="all", tokens=[0, 1, 2], max_new_tokens=NEW_TOKENS)

    started = time.monotonic()
    assert client.cancel(blocker["id"])["cancelled"] is True
    wait_for(lambda: "running" not in _counts(database_url, blocker["id"])[1], CANCEL_BOUND, interval=0.1,
             what=f"the cancelled job's batch to stop within {CANCEL_BOUND}s")
    stopped_in = time.monotonic() - started
    assert _counts(database_url, blocker["id"]) == (0, {"cancelled": 1})
    assert "jobs closed while running here" in worker.log()

    # one batch for both; the cancelled one's rows leave it, the other's are all written
    wait_for(lambda: _decoding(client, gone["id"]), 60, interval=0.2, what="the shared batch decoding")
    assert client.status(kept["id"], include_prompts=False)["progress"]["in_flight"] == LAYERS * 3
    client.cancel(gone["id"])
    final = client.wait(kept["id"], progress=False, timeout=240)
    assert final["state"] == "succeeded" and final["progress"]["done"] == final["progress"]["total"] == LAYERS * 3
    assert _counts(database_url, kept["id"]) == (LAYERS * 3, {"done": 1})
    assert _counts(database_url, gone["id"]) == (0, {"cancelled": 1})
    with session_scope(database_url) as s:
        shared = [r.job_ids for r in s.scalars(select(EngineRun)).all() if gone["id"] in r.job_ids]
    assert shared and kept["id"] in shared[0]
    print(f"cancel stopped the running batch in {stopped_in:.2f}s (bound {CANCEL_BOUND}s)")


def test_client_wait_follows_the_event_stream_to_the_end(served):
    client, server, database_url, _ = served
    job = client.submit([PROMPTS[1]], layers=[0, 1], tokens=[0], max_new_tokens=8)
    seen: list[dict] = []
    events = []
    real = client._follow_events

    def spy(job_id, show, check_deadline, deadline):
        def record(status):
            seen.append(status)
            show(status)
        out = real(job_id, record, check_deadline, deadline)
        events.append(out)
        return out

    client._follow_events = spy
    final = client.wait(job["id"], progress=True, timeout=120)
    assert final["state"] == "succeeded" and final["prompts"]  # the full status, prompts included
    assert events and events[0] is not None and events[0]["state"] == "succeeded"  # ended by the stream's `end`
    assert seen[-1]["progress"]["done"] == 2
    # a finished job's stream is one `end` event
    assert [e for e, _ in _first_events(server.url, job["id"], 5)] == ["end"]


def test_a_chunk_message_with_nothing_to_do_ends_ignored_in_celerys_events(served, redis_url):
    """What Flower shows: the task-ignored event (its reason) and no task-succeeded for a message that did no work."""
    from celery import Celery

    from selfie_jobs.queue import RUN_CHUNK_TASK, model_queue

    app = Celery("events-probe", broker=redis_url, set_as_current=False)
    seen: list[dict] = []
    with app.connection_for_read() as conn:
        receiver = app.events.Receiver(conn, handlers={"*": seen.append})
        listening = threading.Thread(target=lambda: receiver.capture(limit=None, timeout=None, wakeup=False),
                                     daemon=True)
        listening.start()
        time.sleep(1.0)  # the receiver's queue is bound to the events exchange
        task_id = app.send_task(RUN_CHUNK_TASK, args=[987654321], queue=model_queue(MODEL)).id

        def ended():
            return [e["type"] for e in seen if e.get("uuid") == task_id and e["type"] in
                    ("task-ignored", "task-succeeded", "task-failed")]

        wait_for(ended, 60, what="the task to end")
        time.sleep(1.0)  # a success event, were there one, would follow the custom event
        receiver.should_stop = True
    assert ended() == ["task-ignored"]
    reason = next(e for e in seen if e.get("uuid") == task_id and e["type"] == "task-ignored")["reason"]
    assert reason == "no such chunk"


@pytest.fixture
def served_in_small_batches(sqlite_url, redis_url, tmp_path, slow_model_dir):
    """The slow model in engine batches of 8 rows: a job's results arrive a batch at a time, seconds apart."""
    import redis

    from selfie_jobs.migrate import upgrade

    upgrade(sqlite_url)
    redis.Redis.from_url(redis_url).flushdb()
    env = worker_env(sqlite_url, redis_url, tmp_path / "w2", SELFIE_CHUNK_SIZE="64")
    worker = WorkerProcess("livew2", slow_model_dir, env, tmp_path, batch_size=8)
    try:
        settings = settings_for(sqlite_url, redis_url, chunk_size=64, default_model=MODEL, worker_alive_seconds=6,
                                max_new_tokens_cap=NEW_TOKENS, event_poll_seconds=0.2)
        with live_server(settings) as server, Client(server.url) as client:
            def ready():
                if worker.proc.poll() is not None:
                    raise AssertionError(worker.log()[-4000:])
                return any(m["name"] == MODEL and any(w["state"] == "ready" for w in m["workers"])
                           for m in client.models())

            wait_for(ready, 180, what="worker ready")
            wait_for(lambda: "ready." in worker.log(), 30, what="worker consuming")
            yield client, server
    finally:
        worker.stop()
        get_engine.cache_clear()


@pytest.mark.browser
def test_the_job_page_fills_its_grid_in_while_the_job_runs(served_in_small_batches, tmp_path):
    """Headless Chromium on the job page of a running job: the status line shows the rows decoding, and the grid
    gains cells batch by batch from the event stream, with no reload, until the job is done."""
    from selenium.webdriver.common.by import By

    from tests.integration.browser_support import chromium

    client, server = served_in_small_batches
    job = client.submit([PROMPTS[0]], layers="all", tokens=[0, 1, 2, 3], max_new_tokens=300)
    total = LAYERS * 4
    with chromium(tmp_path / "profile") as browser:
        wait_for(lambda: _decoding(client, job["id"]), 60, interval=0.2, what="the job decoding")
        browser.get(f"{server.url}/ui/jobs/{job['id']}")
        wait_for(lambda: browser.execute_script("return document.body.dataset.ready === '1'"), 30, what="the page")
        assert browser.find_element(By.ID, "error").text == ""
        first = len(browser.find_elements(By.CSS_SELECTOR, "#grid td.cell"))
        assert first < total
        wait_for(lambda: "decoding" in browser.find_element(By.ID, "job-progress").text, 20,
                 what="the rows decoding in the status line")
        counts = {first}

        def filled():
            counts.add(len(browser.find_elements(By.CSS_SELECTOR, "#grid td.cell")))
            return browser.execute_script("return document.body.dataset.final === '1'") and total in counts

        wait_for(filled, 240, interval=0.1, what="the grid to fill in")
        # seen part-filled on the way (a batch of 8 rows at a time), then whole, in one page load
        assert any(0 < n < total for n in counts), counts
        assert browser.find_element(By.CSS_SELECTOR, "#job-state .badge").text == "succeeded"
        assert browser.execute_script("return performance.getEntriesByType('navigation').length") == 1
        assert client.status(job["id"])["progress"]["done"] == total
