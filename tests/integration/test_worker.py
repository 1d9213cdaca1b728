"""Real worker processes (`python -m workers worker`, Celery prefork) with real Redis and SQLite/PostgreSQL,
serving a tiny random LLaMA from a Hugging Face folder. Jobs are created through `selfie_jobs.submission`.

Proves: rows are written exactly once; two jobs queued together share one engine run; two workers share one
job; a worker child killed with SIGKILL mid-chunk has its chunk redelivered and finished; chunks whose
messages were lost are re-sent by the start-up reconcile.
"""

from __future__ import annotations

import os
import re
import signal
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from sqlalchemy import func, select

from selfie_jobs import submission
from selfie_jobs.db import get_engine, get_sessionmaker
from selfie_jobs.kinds import get_kind
from selfie_jobs.kinds.edit_requests import ReinforceEditCreate, SupervisedEditCreate
from selfie_jobs.kinds.generate import GenerateJobCreate
from selfie_jobs.kinds.lenses import LensJobCreate
from selfie_jobs.kinds.vectors import VectorJobCreate
from selfie_jobs.models import Chunk, EngineRun, Interpretation, Job, ServedModel, Worker
from selfie_jobs.queue import RECONCILE_TASK
from selfie_jobs.settings import Settings
from selfie_jobs.specs import JobCreate
from tests.integration.worker_support import MODEL, NUM_LAYERS, PROMPTS, WorkerProcess, save_tiny_model, wait_for, \
    worker_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

#: Reference texts of the edit jobs (short: the tiny model's epochs stay fast).
REFS = ["The cat sat on the mat.", "A dog ran to the park.", "Paris is the capital of France.", "What is this?",
        "Sure, I will summarize the message."]
READY_TIMEOUT = 90
JOB_TIMEOUT = 120


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("models") / MODEL)


class Stack:
    """One database, one Redis, the workers of a test, and what a test needs to submit and inspect."""

    def __init__(self, database_url: str, redis_url: str, tmp_path: Path, model_dir: Path):
        from api.broker import make_producer

        self.url = database_url
        self.redis_url = redis_url
        self.tmp = tmp_path
        self.model_dir = model_dir
        self.db = get_sessionmaker(database_url)
        self.settings = Settings(database_url=database_url, redis_url=redis_url, data_dir=tmp_path, chunk_size=4,
                                 auth_enabled=False)
        self.producer = make_producer(redis_url)
        self.workers: list[WorkerProcess] = []

    def start_worker(self, name: str, *, max_batch: int = 256, batch_size: int = 4, extra: tuple[str, ...] = (),
                     model_path: Path | None = None, model: str = MODEL, **env_extra: str) -> WorkerProcess:
        env = worker_env(self.url, self.redis_url, self.tmp / name, SELFIE_MAX_BATCH_INTERPRETATIONS=str(max_batch),
                         **env_extra)
        worker = WorkerProcess(name, model_path or self.model_dir, env, self.tmp, batch_size=batch_size, extra=extra,
                               model=model)
        self.workers.append(worker)
        return worker

    def wait_ready(self, worker: WorkerProcess) -> None:
        def ready():
            if worker.proc.poll() is not None:
                raise AssertionError(f"worker {worker.name} exited:\n{worker.log()[-4000:]}")
            with self.db() as s:
                return s.scalar(select(func.count()).select_from(Worker).where(
                    Worker.name.like(f"{worker.name}@testhost:%"), Worker.state == "ready"))

        wait_for(ready, READY_TIMEOUT, what=f"worker {worker.name} ready")
        # the consumer is attached shortly after the child reports ready
        wait_for(lambda: "ready." in worker.log(), 30, what=f"worker {worker.name} consuming")

    def wait_startup_reconciles(self, *workers: WorkerProcess) -> None:
        """Every worker sends one reconcile when it starts. Until it has run, it may hold the only pool slot of
        whichever worker took it (one message at a time, acks_late), and that worker takes no chunk."""
        done = re.compile(rf"Task {re.escape(RECONCILE_TASK)}\[[^\]]+\] succeeded")
        wait_for(lambda: sum(len(done.findall(w.log())) for w in workers) >= len(workers), 60,
                 what="the start-up reconciles")

    def request(self, **kw) -> JobCreate:
        body = {"model": MODEL, "prompts": list(PROMPTS[:1]), "targets": {"layers": [0, 1, 2], "tokens": [0, 1, 2]},
                "template": {"preset": "summarize"}, "max_new_tokens": 3}
        body.update(kw)
        return JobCreate(**body)

    def vectors_request(self, count: int, **kw) -> VectorJobCreate:
        """`count` different vectors of the tiny model's hidden size (32), labelled v0, v1, ..."""
        vectors = [[((i + 1) * ((j * 7 + i) % 11 - 5)) / 4 for j in range(32)] for i in range(count)]
        body = {"model": MODEL, "vectors": vectors, "labels": [f"v{i}" for i in range(count)],
                "template": {"preset": "summarize"}, "max_new_tokens": 3}
        body.update(kw)
        return VectorJobCreate(**body)

    def kind_request(self, kind: str, *, prompts=PROMPTS[:1], tokens=(0, 1, 2), max_new_tokens: int = 3):
        """A job of `kind` with as many results as an interpret job over `prompts` x all layers x `tokens`."""
        if kind == "interpret":
            return self.request(prompts=list(prompts), targets={"layers": "all", "tokens": list(tokens)},
                                max_new_tokens=max_new_tokens)
        if kind == "supervised":  # about as long as the interpret job: epochs of four reference texts each
            return SupervisedEditCreate(model=MODEL, source={"prompt": prompts[0], "layer": 1, "token": -1},
                                        target={"prompt": PROMPTS[1], "layer": 2, "token": -1}, reference_texts=REFS,
                                        epochs=min(1000, 12 * len(prompts) * len(tokens) * max_new_tokens),
                                        lr=1e-3, max_new_tokens=3)
        if kind == "reinforce":  # each epoch interprets every position of the prompt
            return ReinforceEditCreate(model=MODEL, prompt=prompts[0], layer=1, k=1, max_new_tokens=max_new_tokens,
                                       epochs=min(1000, 6 * len(prompts) * len(tokens)), lr=1e-2,
                                       judge={"type": "keywords", "words": ["the", "a"]})
        if kind == "lenses":
            # a lens reading costs about what one decode step does: as many readings as the interpretations'
            # steps, so that a job lasts as long as the tests that interrupt it expect
            return LensJobCreate(model=MODEL, prompts=list(prompts) * max_new_tokens,
                                 targets={"layers": "all", "tokens": list(tokens)}, top_k=3)
        if kind == "generate":
            # each prompt once per interpretation the interpret job would have, raw (the tiny model's chat turns may
            # end at once): every generation runs all max_new_tokens steps, as an interpretation's decoding does
            return GenerateJobCreate(model=MODEL, prompts=list(prompts) * ((NUM_LAYERS + 1) * len(tokens)),
                                     chat=False, max_new_tokens=max_new_tokens)
        return self.vectors_request(len(prompts) * (NUM_LAYERS + 1) * len(tokens), max_new_tokens=max_new_tokens)

    def submit(self, request: JobCreate | VectorJobCreate) -> str:
        with self.db() as s:
            return submission.submit_job(s, request, self.settings, self.producer).job.id

    def rows(self, job_id: str) -> int:
        """Result rows stored for the job, in its kind's table."""
        with self.db() as s:
            table = get_kind(s.get(Job, job_id).kind).table
            return s.scalar(select(func.count()).select_from(table).where(table.job_id == job_id))

    def store_only(self, request: JobCreate) -> tuple[str, list[int]]:
        """Write a job like a submit does, without sending its messages."""
        with self.db() as s:
            prepared = submission.prepare_job(s, request, self.settings)
            job, chunks = submission.store_job(s, prepared, request, None, self.settings, None)
            s.commit()
            return job.id, [c.id for c in chunks]

    def enqueue(self, job_id: str) -> None:
        with self.db() as s:
            chunks = s.scalars(select(Chunk).where(Chunk.job_id == job_id).order_by(Chunk.index)).all()
            submission.enqueue_chunks(s, self.producer, chunks, MODEL, 5)

    def wait_jobs(self, *job_ids: str, timeout: float = JOB_TIMEOUT) -> list[Job]:
        def finished():
            with self.db() as s:
                jobs = [s.get(Job, j) for j in job_ids]
                return jobs if all(j.state in ("succeeded", "failed", "cancelled") for j in jobs) else None

        try:
            return wait_for(finished, timeout, interval=0.3, what=f"jobs {job_ids}")
        except TimeoutError:
            logs = "\n".join(f"--- {w.name}\n{w.log()[-3000:]}" for w in self.workers)
            raise AssertionError(f"jobs did not finish; worker logs:\n{logs}") from None

    def assert_exactly_once(self, job_id: str) -> list[Interpretation]:
        """Every item of the job has exactly one row in its kind's table (interpretations, vector results)."""
        with self.db() as s:
            job = s.get(Job, job_id)
            kind = get_kind(job.kind)
            rows = s.scalars(select(kind.table).where(kind.table.job_id == job_id)).all()
            chunks = s.scalars(select(Chunk).where(Chunk.job_id == job_id)).all()
        assert job.state == "succeeded", job.error
        assert len(rows) == job.total == job.done, (len(rows), job.total, job.done)
        if kind.item_columns:
            keys = Counter(tuple(getattr(r, c) for c in kind.item_columns) for r in rows)
            assert max(keys.values()) == 1
            expected = {tuple(item) for c in chunks for item in c.items}
            assert set(keys) == expected
        else:  # an edit: one row (its variant) for its one item
            assert len(rows) == 1 and [c.items for c in chunks] == [[[0]]]
        assert {c.state for c in chunks} == {"done"}
        return list(rows)

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.producer.close()
        get_engine.cache_clear()


@pytest.fixture(scope="module")
def private_redis_url(tmp_path_factory):
    """A real redis-server of this module's own (the embedded one `selfie up` uses).

    Not the shared local server: test sessions running side by side use the same queue names ("selfie.model.tiny")
    there, so another session's worker could take this test's messages, and its flushdb could drop them.
    """
    from workers.embedded import start_embedded_redis

    with start_embedded_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


@pytest.fixture
def stack(migrated_database_url, private_redis_url, tmp_path, tiny_model_dir):
    redis.Redis.from_url(private_redis_url).flushdb()
    s = Stack(migrated_database_url, private_redis_url, tmp_path, tiny_model_dir)
    try:
        yield s
    finally:
        s.close()


def test_worker_serves_jobs_once_and_batches_two_jobs_in_one_engine_run(stack):
    worker = stack.start_worker("w1")
    stack.wait_ready(worker)
    with stack.db() as s:
        card = s.get(ServedModel, MODEL)
        assert card.num_layers == NUM_LAYERS and card.tokenizer_json and "summarize" in card.card["presets"]
        assert card.card["presets"]["summarize"]["num_tokens"] > 0

    # two jobs stored before either message is sent: the first message's claim takes both jobs' chunks
    a, a_chunks = stack.store_only(stack.request(prompts=[PROMPTS[0]]))
    b, b_chunks = stack.store_only(stack.request(prompts=[PROMPTS[1]]))
    stack.enqueue(a)
    stack.enqueue(b)
    stack.wait_jobs(a, b)
    rows = stack.assert_exactly_once(a) + stack.assert_exactly_once(b)
    assert all(r.text is not None and r.source_token for r in rows)
    with stack.db() as s:
        runs = s.scalars(select(EngineRun)).all()
    shared = [r for r in runs if set(r.job_ids) == {a, b}]
    assert shared, [(r.job_ids, r.chunk_ids) for r in runs]
    assert set(shared[0].chunk_ids) == set(a_chunks + b_chunks)
    assert {r.engine_run_id for r in rows} == {shared[0].id}

    # the redelivered messages (each chunk had its own) were no-ops; a second submit of the same key is too
    before = len(rows)
    job = stack.submit(stack.request(idempotency_key="k1"))
    assert stack.submit(stack.request(idempotency_key="k1")) == job
    stack.wait_jobs(job)
    stack.assert_exactly_once(job)
    with stack.db() as s:
        assert s.scalar(select(func.count()).select_from(Interpretation)) == before + s.get(Job, job).total

    def heartbeat_counts():  # the heartbeat thread publishes what the worker served
        with stack.db() as s:
            info = s.scalars(select(Worker.info).where(Worker.state == "ready")).first()
        return info and info["batches_served"] >= 2 and info["rows_served"] == before + 9

    wait_for(heartbeat_counts, 10, what="heartbeat with the served counts")


def test_two_workers_share_one_job(stack):
    # one chunk per engine run, so the chunks of one job spread over both workers; w2 turns CUDA graphs off and
    # w1 picks the Triton decode attention, which their heartbeats report (on the CPU both take eager steps)
    w1 = stack.start_worker("w1", max_batch=4, batch_size=2, extra=("--decode-attention", "triton"))
    w2 = stack.start_worker("w2", max_batch=4, batch_size=2, extra=("--no-cuda-graphs",))
    stack.wait_ready(w1)
    stack.wait_ready(w2)
    with stack.db() as s:
        decode = {w.name.split("@")[0]: (w.info["cuda_graphs"], w.info["decode_attention"], w.info["rms_norm"])
                  for w in s.scalars(select(Worker))}
    assert decode == {"w1": (True, "triton", "model"), "w2": (False, "sdpa", "model")}
    stack.wait_startup_reconciles(w1, w2)  # else one worker may sit on it while the other runs the whole job
    job = stack.submit(stack.request(prompts=list(PROMPTS), targets={"layers": "all", "tokens": [0, 1, 2, 3]},
                                     max_new_tokens=6))
    stack.wait_jobs(job)
    rows = stack.assert_exactly_once(job)
    served_by = Counter(r.worker.split("@")[0] for r in rows)
    assert set(served_by) == {"w1", "w2"}, served_by


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("kind", ["interpret", "vectors", "lenses", "generate"])
def test_sigkill_of_the_worker_child_mid_chunk_redelivers_and_finishes(stack, kind):
    worker = stack.start_worker("w1", max_batch=32, batch_size=1)
    stack.wait_ready(worker)
    (child,) = worker.children()
    # one big chunk, written in several engine batches (batch_size 1): kill after the first rows landed
    stack.settings = stack.settings.model_copy(update={"chunk_size": 32})
    job = stack.submit(stack.kind_request(kind, prompts=PROMPTS, tokens=(0, 1, 2, 3, 4), max_new_tokens=24))

    def partly_written():
        with stack.db() as s:
            done = stack.rows(job)
            total = s.get(Job, job).total
            return 0 < done < total and done

    written = wait_for(partly_written, 60, interval=0.05, what="the first rows of the chunk")
    os.kill(child, signal.SIGKILL)
    with stack.db() as s:
        assert stack.rows(job) < s.get(Job, job).total
    stack.wait_jobs(job)
    stack.assert_exactly_once(job)
    with stack.db() as s:
        chunks = s.scalars(select(Chunk).where(Chunk.job_id == job)).all()
        owner_pids = set(s.scalars(select(Worker.pid).where(Worker.name.in_({c.owner for c in chunks}))))
        attempts = [c.attempts for c in chunks]
    assert child not in worker.children() and len(worker.children()) == 1  # the parent started a new child
    assert max(attempts) >= 2 and owner_pids and child not in owner_pids
    assert written > 0
    # the very message of the killed child was put back (acks_late + reject_on_worker_lost) and run again
    received = Counter(re.findall(r"selfie\.run_chunk\[([0-9a-f-]+)\] received", worker.log()))
    assert received.most_common(1)[0][1] == 2, received


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_chunks_whose_messages_were_lost_are_resent_at_worker_start(stack):
    # the card must exist to submit: serve once, stop, then store a job whose messages never reach Redis
    first = stack.start_worker("w0")
    stack.wait_ready(first)
    first.stop()
    job, _ = stack.store_only(stack.request())
    with stack.db() as s, s.begin():
        stored = s.get(Job, job)
        stored.created_at = stored.created_at - timedelta(minutes=5)
    worker = stack.start_worker("w1")
    stack.wait_ready(worker)
    stack.wait_jobs(job)
    stack.assert_exactly_once(job)
