"""Load: many concurrent submitters against the API on loopback (uvicorn process, real Redis, PostgreSQL or
SQLite) with a real worker process (a tiny random LLaMA) behind it.

No 5xx and no transport error, every accepted job completes with each of its rows exactly once, and the submit
latency percentiles are printed and written to `<artifacts>/load_submit.json` (`SELFIE_ARTIFACTS_DIR`, default
`artifacts/`). Knobs: SELFIE_LOAD_SECONDS (60), SELFIE_LOAD_SUBMITTERS (200), SELFIE_LOAD_THINK_SECONDS (pause of
each submitter after an answer, 1.0), SELFIE_LOAD_MAX_JOBS (6000), SELFIE_LOAD_DRAIN_SECONDS (time for the worker
to finish after the last submit, 90), SELFIE_LOAD_DATABASE (postgres | sqlite; postgres when a server answers).
"""

from __future__ import annotations

import json
import os
import random
import uuid
from pathlib import Path

import pytest
from sqlalchemy import func, select

from selfie_jobs.db import get_engine, session_scope
from selfie_jobs.migrate import upgrade
from selfie_jobs.models import Interpretation, Job
from tests import services
from tests.integration.worker_support import MODEL, save_tiny_model
from tests.load.loadsupport import ServiceStack, run_load, wait_jobs_finished, write_json

ROOT = Path(__file__).resolve().parents[2]
SECONDS = float(os.environ.get("SELFIE_LOAD_SECONDS", "60"))
SUBMITTERS = int(os.environ.get("SELFIE_LOAD_SUBMITTERS", "200"))
THINK = float(os.environ.get("SELFIE_LOAD_THINK_SECONDS", "1.0"))
MAX_JOBS = int(os.environ.get("SELFIE_LOAD_MAX_JOBS", "6000"))
DRAIN = float(os.environ.get("SELFIE_LOAD_DRAIN_SECONDS", "90"))
WORDS = "the cat sat on a mat while paris is the capital of france and a dog ran to the park".split()

pytestmark = [pytest.mark.slow, pytest.mark.timeout(int(SECONDS + DRAIN + 240))]


def _database(tmp_path: Path):
    kind = os.environ.get("SELFIE_LOAD_DATABASE")
    admin = services.postgres_admin_url() if kind in (None, "postgres") else None
    if admin is None and kind == "postgres":
        pytest.skip("no PostgreSQL server answers")
    if admin is not None:
        return "postgres", services.create_postgres_database(admin), admin
    return "sqlite", f"sqlite:///{tmp_path / 'load.db'}", None


def job_body(submitter: int, i: int) -> dict:
    """One short prompt, one or two interpretations, two new tokens: the same engine settings for every job, so
    the worker batches across jobs."""
    rng = random.Random(submitter * 100_003 + i)
    prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))
    pairs = [[1, -1]] if i % 2 == 0 else [[1, -1], [2, 0]]
    return {"prompts": [prompt], "targets": {"pairs": pairs}, "max_new_tokens": 2,
            "idempotency_key": f"load-{submitter}-{i}-{uuid.uuid4().hex[:8]}"}


def test_concurrent_submitters_no_5xx_every_job_completes(tmp_path):
    from workers.embedded import start_embedded_redis

    kind, database_url, admin = _database(tmp_path)
    upgrade(database_url)
    model_dir = save_tiny_model(tmp_path / MODEL)
    try:
        with start_embedded_redis(tmp_path / "redis") as redis_server, ServiceStack(
            tmp_path, database_url, redis_server.url, MODEL, model_path=model_dir, batch_size=64,
            env={"OMP_NUM_THREADS": "1", "SELFIE_MAX_BATCH_INTERPRETATIONS": "256"},
        ) as stack:
            stack.wait_ready()
            result = run_load(stack.url, job_body, submitters=SUBMITTERS, seconds=SECONDS, think_s=THINK,
                              max_requests=MAX_JOBS)
            states = wait_jobs_finished(database_url, DRAIN)
            with session_scope(database_url) as s:
                rows = s.scalar(select(func.count()).select_from(Interpretation))
                distinct = s.scalar(select(func.count()).select_from(
                    select(Interpretation.job_id, Interpretation.prompt_index, Interpretation.layer,
                           Interpretation.token).distinct().subquery()))
                stored_jobs = s.scalar(select(func.count()).select_from(Job))
                finished = s.execute(select(func.min(Job.created_at), func.max(Job.finished_at))).one()
            api_log, worker_log = stack.log("api"), stack.log("worker")
    finally:
        get_engine.cache_clear()
        if admin is not None:
            services.drop_postgres_database(admin, database_url)

    report = result.summary()
    report.update(database=kind, think_s=THINK, max_jobs=MAX_JOBS, job_states=states, stored_jobs=stored_jobs,
                  interpretation_rows=rows, cpus=os.cpu_count(),
                  completion_s=round((finished[1] - finished[0]).total_seconds(), 2) if finished[1] else None)
    if report["completion_s"]:
        report["jobs_completed_per_s"] = round(states.get("succeeded", 0) / report["completion_s"], 2)
    path = write_json(Path(os.environ.get("SELFIE_ARTIFACTS_DIR", ROOT / "artifacts")) / "load_submit.json", report)
    print("\nload test:", json.dumps(report, indent=1), "\nwritten to", path)

    assert not [code for code in result.statuses if code >= 500], (report, api_log[-3000:])
    assert not result.errors, report
    assert set(result.statuses) <= {200, 202}, report
    assert result.accepted and stored_jobs == len(set(result.accepted)), report
    assert states == {"succeeded": stored_jobs}, (report, worker_log[-3000:])
    assert rows == distinct == result.interpretations, report
