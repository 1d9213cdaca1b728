"""A real worker under faults: out of memory, a CUDA device-side error, a job the engine rejects, SIGTERM, a
database outage and a Redis flush (these two for every job kind, the edits included).

OOM and device errors are injected (`--inject-fault`, workers.faults) since the tests run on CPU; everything
else (Celery prefork, Redis redelivery, the database) is real.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections import Counter
from contextlib import contextmanager

import pytest
from sqlalchemy import select

from selfie_jobs.models import Chunk, Job, Worker
from selfie_jobs.queue import EDIT_KINDS
from tests.integration.test_worker import private_redis_url, stack, tiny_model_dir  # noqa: F401 - fixtures
from tests.integration.worker_support import MODEL, PROMPTS, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
SQLITE = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


@SQLITE
def test_out_of_memory_splits_the_batch_and_the_job_completes(stack):
    worker = stack.start_worker("w1", batch_size=8, extra=("--inject-fault", "oom-above:3"))
    stack.wait_ready(worker)
    a, _ = stack.store_only(stack.request(prompts=[PROMPTS[0]]))
    b, _ = stack.store_only(stack.request(prompts=[PROMPTS[1]]))
    stack.enqueue(a)
    stack.enqueue(b)
    stack.wait_jobs(a, b)
    stack.assert_exactly_once(a)
    stack.assert_exactly_once(b)
    assert "out of memory on" in worker.log()


@SQLITE
def test_device_failure_restarts_the_process_and_the_work_is_finished(stack, tmp_path):
    marker = tmp_path / "fired"
    worker = stack.start_worker("w1", extra=("--inject-fault", f"device-once:{marker}"))
    stack.wait_ready(worker)
    (first_child,) = worker.children()
    job = stack.submit(stack.request())
    stack.wait_jobs(job)
    stack.assert_exactly_once(job)
    assert marker.exists()
    log = worker.log()
    assert "device failure in chunk" in log and "exited with 'exitcode 70'" in log
    assert first_child not in worker.children()
    with stack.db() as s:
        states = dict(s.execute(select(Worker.pid, Worker.state)).all())
    assert states[first_child] == "dead"


@SQLITE
def test_a_model_that_does_not_load_stops_the_worker_and_its_job_waits(stack, tmp_path):
    missing = tmp_path / "no-such-model"
    first = stack.start_worker("w0")  # publishes the model card that submissions check, then goes away
    stack.wait_ready(first)
    first.stop()
    job = stack.submit(stack.request())
    broken = stack.start_worker("w1", model_path=missing, SELFIE_WORKER_LOAD_ATTEMPTS="2",
                                SELFIE_WORKER_LOAD_BACKOFF_SECONDS="0.5")
    assert broken.proc.wait(180) == 3, broken.log()[-4000:]
    log = broken.log()
    assert "could not be loaded (try 1 of 2); this process exits and the next try starts in 0 s" in log
    # the command's own last word; a child the parent started while it was being stopped may count as a third try
    assert re.search(rf"model {MODEL!r} could not be loaded \([23] tries in a row\): FileNotFoundError: "
                     rf"no model folder at {re.escape(str(missing))}", log), log[-3000:]
    with stack.db() as s:
        tries = s.scalars(select(Worker).where(Worker.name.like("w1@testhost:%"))).all()
        assert s.get(Job, job).state == "queued"
    assert len(tries) >= 2 and {w.state for w in tries} == {"load_failed"}
    assert all(w.info["error"] == f"FileNotFoundError: no model folder at {missing}" for w in tries)

    worker = stack.start_worker("w2")  # a worker that can load the model finds the job waiting
    stack.wait_ready(worker)
    stack.wait_jobs(job)
    stack.assert_exactly_once(job)


@SQLITE
def test_a_job_the_engine_rejects_fails_clearly_and_the_worker_goes_on(stack):
    worker = stack.start_worker("w1")
    stack.wait_ready(worker)
    good, _ = stack.store_only(stack.request(prompts=[PROMPTS[0]]))
    bad, bad_chunks = stack.store_only(stack.request(prompts=[PROMPTS[1]]))
    with stack.db() as s, s.begin():  # a token index past the prompt's end (the API would have refused it)
        chunk = s.get(Chunk, bad_chunks[0])
        chunk.items = [[0, 0, 500], *chunk.items[1:]]
    stack.enqueue(bad)
    stack.enqueue(good)
    stack.wait_jobs(good, bad)
    stack.assert_exactly_once(good)
    with stack.db() as s:
        failed = s.get(Job, bad)
    assert failed.state == "failed" and "token" in failed.error and "500" in failed.error, failed.error
    # and it keeps serving
    later = stack.submit(stack.request(prompts=[PROMPTS[1]], idempotency_key="after"))
    stack.wait_jobs(later)
    stack.assert_exactly_once(later)


def _start_one_row_worker(stack):
    """A worker that runs one interpretation per engine batch, with 8-interpretation chunks: jobs take a while."""
    worker = stack.start_worker("w1", max_batch=8, batch_size=1)
    stack.wait_ready(worker)
    stack.settings = stack.settings.model_copy(update={"chunk_size": 8})
    return worker


def _submit_long_job(stack, max_new_tokens: int, kind: str = "interpret") -> str:
    return stack.submit(stack.kind_request(kind, prompts=PROMPTS, tokens=(0, 1, 2, 3), max_new_tokens=max_new_tokens))


def _epochs(stack, job: str) -> int:
    from sqlalchemy import func

    from selfie_jobs.models import EditEpoch

    with stack.db() as s:
        return s.scalar(select(func.count()).select_from(EditEpoch).where(EditEpoch.job_id == job))


def _wait_running_chunk(stack, job: str) -> int:
    def running():
        with stack.db() as s:
            return s.scalars(select(Chunk.id).where(Chunk.job_id == job, Chunk.state == "running")).first()

    return wait_for(running, 60, interval=0.05, what="a running chunk")


@SQLITE
def test_sigterm_finishes_the_running_chunk_before_exiting(stack):
    worker = _start_one_row_worker(stack)
    job = _submit_long_job(stack, max_new_tokens=24)
    chunk_id = _wait_running_chunk(stack, job)
    os.kill(worker.pid, signal.SIGTERM)  # warm shutdown, as docker stop / systemd send it to the main process
    worker.proc.wait(60)
    with stack.db() as s:
        states = Counter(s.scalars(select(Chunk.state).where(Chunk.job_id == job)).all())
        finished = s.get(Chunk, chunk_id)
    assert finished.state == "done"
    assert states["running"] == 0 and states["queued"] >= 1, states
    assert "Warm shutdown" in worker.log()


@pytest.mark.parametrize("database_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
@pytest.mark.parametrize("kind", ["interpret", "vectors", "lenses", "generate", "supervised", "reinforce"])
def test_database_unavailable_for_10s_mid_job_loses_nothing(stack, postgres_admin_url, kind):
    import time

    from sqlalchemy import create_engine, func, text
    from sqlalchemy.engine import make_url

    from selfie_jobs.kinds import get_kind
    from selfie_jobs.models import utcnow

    worker = _start_one_row_worker(stack)
    job = _submit_long_job(stack, max_new_tokens=12, kind=kind)
    table = get_kind(kind).table  # the kind's result table

    def rows(since=None):
        with stack.db() as s:
            query = select(func.count()).select_from(table).where(table.job_id == job)
            if since is not None:
                query = query.where(table.created_at > since)
            return s.scalar(query)

    if kind in EDIT_KINDS:  # an edit stores its variant at the end: its first epochs show it is under way
        wait_for(lambda: _epochs(stack, job) >= 2, 60, interval=0.05, what="the edit's first epochs")
    else:
        wait_for(rows, 60, interval=0.05, what="the first rows")
    name = make_url(stack.url).database
    admin = create_engine(postgres_admin_url, isolation_level="AUTOCOMMIT")
    log_before = len(worker.log())
    with stack.db() as s:
        total = s.get(Job, job).total
    written_before = rows()
    cut_at = utcnow()
    try:
        with admin.connect() as conn:  # no new connections, and every open one cut: the database is gone
            conn.execute(text(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false'))
            conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE datname = :n AND pid <> pg_backend_pid()"), {"n": name})
        down_since = time.monotonic()
        # down for 10 s, and at least until a unit of the worker's job work has hit the outage and is retrying
        # (selfie_jobs.retry's message; the heartbeat thread logs "heartbeat failed, database unavailable")
        wait_for(lambda: "database unavailable (attempt" in worker.log()[log_before:]
                 and time.monotonic() - down_since >= 10, 60, what="the worker retrying through the outage")
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true'))
        admin.dispose()
    assert written_before < total  # results were still missing when the database went away ...
    stack.wait_jobs(job)
    stack.assert_exactly_once(job)
    assert rows(since=cut_at) > 0  # ... and were written after it came back, each exactly once


@SQLITE
@pytest.mark.parametrize("kind", ["interpret", "vectors", "lenses", "generate", "supervised", "reinforce"])
def test_redis_flushed_with_work_queued_and_running_loses_no_job(stack, kind):
    import redis as redis_client

    worker = _start_one_row_worker(stack)
    with _beat(stack):
        job = _submit_long_job(stack, max_new_tokens=12, kind=kind)
        # A second job waits queued behind it, with other engine settings (another batch key): the task running the
        # first job's runs back to back takes the first job's queued chunks from the database itself, but never
        # another batch key's, so only the reconciler can bring the second job's lost messages back. (An edit is
        # one chunk, and edits are not served between epochs.)
        other = stack.kind_request(kind, prompts=PROMPTS, tokens=(0, 1, 2, 3), max_new_tokens=11)
        if kind == "lenses":  # lens jobs take no max_new_tokens
            other = other.model_copy(update={"top_k": 2})
        jobs = [job, stack.submit(other)]
        _wait_running_chunk(stack, job)
        redis_client.Redis.from_url(stack.redis_url).flushall()  # every queued message is gone
        with stack.db() as s:
            queued = s.scalars(select(Chunk.id).where(Chunk.job_id.in_(jobs), Chunk.state == "queued")).all()
        assert queued, "the job finished before the flush; make it bigger"
        stack.wait_jobs(*jobs)
        for one in jobs:
            stack.assert_exactly_once(one)
        assert "reconcile: re-sent" in worker.log()


@pytest.mark.parametrize("database_url", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)],
                         indirect=True)
@pytest.mark.parametrize("kind", ["interpret", "vectors", "generate"])
def test_sigkill_while_a_run_completes_after_its_task_returned_loses_nothing(stack, tmp_path, kind):
    # The engine is done and the task has returned (its message acknowledged); the run's last rows are still being
    # written in the background (workers.overlap) when the process dies. Nobody will redeliver that message: the
    # reconciler finds the chunk running under an owner that is gone and sends it again.
    marker = tmp_path / "holding"
    worker = stack.start_worker("w1", max_batch=32, batch_size=1,
                                extra=("--inject-fault", f"hold-completion:{marker}"))
    stack.wait_ready(worker)
    with _beat(stack):
        job = _submit_one_chunk_job(stack, kind)
        wait_for(marker.exists, 60, interval=0.05, what="the writer holding the chunk's last rows")
        wait_for(lambda: "'completing': True" in worker.log(), 30, interval=0.05, what="the task returning")
        _kill_and_check_each_row_once(stack, worker, job)
        assert "reconcile: re-sent" in worker.log()


@pytest.mark.parametrize("database_url", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)],
                         indirect=True)
@pytest.mark.parametrize("kind", ["interpret", "vectors", "generate"])
def test_sigkill_while_the_writer_holds_rows_loses_nothing_and_writes_each_row_once(stack, tmp_path, kind):
    # The writer thread commits the first write and then holds the second (handed over, not committed) until the
    # process dies; the engine goes on computing meanwhile, up to the bounded hand-off.
    marker = tmp_path / "holding"
    worker = stack.start_worker("w1", max_batch=32, batch_size=1, extra=("--inject-fault", f"hold-write:{marker}"))
    stack.wait_ready(worker)
    job = _submit_one_chunk_job(stack, kind)
    wait_for(marker.exists, 60, interval=0.05, what="the writer holding rows")
    _kill_and_check_each_row_once(stack, worker, job)
    assert "holding" in marker.read_text()


def _submit_one_chunk_job(stack, kind: str) -> str:
    stack.settings = stack.settings.model_copy(update={"chunk_size": 32})  # one chunk, written in many writes
    return stack.submit(stack.kind_request(kind, prompts=PROMPTS, tokens=(0, 1, 2), max_new_tokens=8))


def _kill_and_check_each_row_once(stack, worker, job: str) -> None:
    """SIGKILL the worker's child while its one chunk is running with some rows stored; the job then completes
    elsewhere (a new child) with every row once, the chunk on its second attempt."""
    (child,) = worker.children()
    with stack.db() as s:
        written, total = stack.rows(job), s.get(Job, job).total
        (chunk,) = s.scalars(select(Chunk).where(Chunk.job_id == job)).all()
        assert 0 < written < total and chunk.state == "running" and chunk.attempts == 1
    os.kill(child, signal.SIGKILL)
    stack.wait_jobs(job)
    stack.assert_exactly_once(job)
    with stack.db() as s:
        (chunk,) = s.scalars(select(Chunk).where(Chunk.job_id == job)).all()
        finished = s.get(Job, job)
        assert (finished.state, finished.done, chunk.state) == ("succeeded", total, "done")
        owner_pid = s.scalar(select(Worker.pid).where(Worker.name == chunk.owner))
    assert chunk.attempts == 2 and owner_pid != child and child not in worker.children()


@contextmanager
def _beat(stack):
    """Celery beat for the stack, reconciling every second, stopped on the way out."""
    from tests.integration.worker_support import ROOT, worker_env

    env = worker_env(stack.url, stack.redis_url, stack.tmp / "beat", SELFIE_RECONCILE_INTERVAL_SECONDS="1")
    with open(stack.tmp / "beat.log", "wb") as beat_log:
        beat = subprocess.Popen([sys.executable, "-m", "workers", "beat", "--schedule",
                                 str(stack.tmp / "beat-schedule")],
                                cwd=ROOT, env=env, stdout=beat_log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield beat
        finally:
            os.killpg(beat.pid, signal.SIGTERM)
            beat.wait(20)
