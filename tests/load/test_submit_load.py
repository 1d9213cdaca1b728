"""Load: many concurrent submitters without think time against the API on loopback (a uvicorn process, auth on,
real Redis) with a real worker process (a tiny random LLaMA) behind it, on SQLite and on PostgreSQL.

No 5xx and no transport error; the set of jobs answered 202 is the set of jobs stored (matched by idempotency key:
a refused submit stored nothing, an accepted one is there under the key it was sent with); every stored job
completes with each of its rows exactly once. The figures are printed and written to
`<artifacts>/load_submit_<database>.json` (`SELFIE_ARTIFACTS_DIR`, default `artifacts/`). Knobs:
SELFIE_LOAD_SECONDS (30 per database), SELFIE_LOAD_SUBMITTERS (100), SELFIE_LOAD_KEYS (API keys the submitters
share, 10), SELFIE_LOAD_THINK_SECONDS (pause of each submitter after an answer, 0), SELFIE_LOAD_MAX_JOBS (6000),
SELFIE_LOAD_DRAIN_SECONDS (time for the worker to finish after the last submit, 120), SELFIE_LOAD_DATABASE
(sqlite | postgres: only that one; default both, PostgreSQL skipped when no server answers).
"""

from __future__ import annotations

import json
import os
import random
import uuid
from pathlib import Path

import pytest
from sqlalchemy import func, select

from selfie_jobs.auth import create_key
from selfie_jobs.db import get_engine, session_scope
from selfie_jobs.migrate import upgrade
from selfie_jobs.models import Interpretation, Job
from tests import services
from tests.integration.worker_support import MODEL, save_tiny_model
from tests.load.loadsupport import ServiceStack, run_load, wait_jobs_finished, write_json

ROOT = Path(__file__).resolve().parents[2]
SECONDS = float(os.environ.get("SELFIE_LOAD_SECONDS", "30"))
SUBMITTERS = int(os.environ.get("SELFIE_LOAD_SUBMITTERS", "100"))
KEYS = int(os.environ.get("SELFIE_LOAD_KEYS", "10"))
THINK = float(os.environ.get("SELFIE_LOAD_THINK_SECONDS", "0"))
MAX_JOBS = int(os.environ.get("SELFIE_LOAD_MAX_JOBS", "6000"))
DRAIN = float(os.environ.get("SELFIE_LOAD_DRAIN_SECONDS", "120"))
ONLY = os.environ.get("SELFIE_LOAD_DATABASE")
WORDS = "the cat sat on a mat while paris is the capital of france and a dog ran to the park".split()

pytestmark = [pytest.mark.slow, pytest.mark.timeout(int(SECONDS + DRAIN + 300))]

DATABASES = [pytest.param(kind, marks=[pytest.mark.postgres] if kind == "postgres" else [])
             for kind in ("sqlite", "postgres") if ONLY in (None, kind)]


@pytest.fixture
def load_database(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'load.db'}"
        return
    admin = services.postgres_admin_url()
    if admin is None:
        pytest.skip("no PostgreSQL server answers")
    url = services.create_postgres_database(admin)
    try:
        yield url
    finally:
        get_engine.cache_clear()
        services.drop_postgres_database(admin, url)


def job_body(submitter: int, i: int) -> dict:
    """One short prompt, one or two interpretations, two new tokens: the same engine settings for every job, so
    the worker batches across jobs. The idempotency key names the request, to match answers with stored jobs."""
    rng = random.Random(submitter * 100_003 + i)
    prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))
    pairs = [[1, -1]] if i % 2 == 0 else [[1, -1], [2, 0]]
    return {"prompts": [prompt], "targets": {"pairs": pairs}, "max_new_tokens": 2,
            "idempotency_key": f"load-{submitter}-{i}-{uuid.uuid4().hex[:8]}"}


@pytest.mark.parametrize("load_database", DATABASES, indirect=True)
def test_concurrent_submitters_no_5xx_every_answer_matches_the_database(load_database, tmp_path):
    from workers.embedded import start_embedded_redis

    database_url = load_database
    kind = "sqlite" if database_url.startswith("sqlite") else "postgres"
    upgrade(database_url)
    with session_scope(database_url) as s:
        keys = [create_key(s, f"load-{n}") for n in range(KEYS)]
        secrets = [secret for _, secret in keys]
        key_ids = [row.id for row, _ in keys]
    model_dir = save_tiny_model(tmp_path / MODEL)
    try:
        with start_embedded_redis(tmp_path / "redis") as redis_server, ServiceStack(
            tmp_path, database_url, redis_server.url, MODEL, model_path=model_dir, batch_size=64,
            env={"OMP_NUM_THREADS": "1", "SELFIE_MAX_BATCH_INTERPRETATIONS": "256", "SELFIE_AUTH_ENABLED": "true",
                 # the per-key rate limit is not what is measured here (its own tests cover it)
                 "SELFIE_RATE_LIMIT_PER_MINUTE": "1000000"},
        ) as stack:
            stack.wait_ready(api_key=secrets[0])
            result = run_load(stack.url, job_body, submitters=SUBMITTERS, seconds=SECONDS, think_s=THINK,
                              max_requests=MAX_JOBS,
                              headers=lambda n: {"Authorization": f"Bearer {secrets[n % KEYS]}"})
            states = wait_jobs_finished(database_url, DRAIN)
            with session_scope(database_url) as s:
                rows = s.scalar(select(func.count()).select_from(Interpretation))
                distinct = s.scalar(select(func.count()).select_from(
                    select(Interpretation.job_id, Interpretation.prompt_index, Interpretation.layer,
                           Interpretation.token).distinct().subquery()))
                stored = dict(s.execute(select(Job.idempotency_scope, Job.id)).all())
                finished = s.execute(select(func.min(Job.created_at), func.max(Job.finished_at))).one()
            api_log, worker_log = stack.log("api"), stack.log("worker")
    finally:
        get_engine.cache_clear()

    # what the clients were told, in the database's terms: idempotency scope "<key id>:<key>" -> job id
    answered = {f"{key_ids[n % KEYS]}:{idem}": job_id for idem, (n, status, job_id) in result.outcomes.items()
                if status in (200, 202)}
    refused = {f"{key_ids[n % KEYS]}:{idem}" for idem, (n, status, _) in result.outcomes.items()
               if status not in (200, 202)}
    report = result.summary()
    report.update(database=kind, keys=KEYS, think_s=THINK, max_jobs=MAX_JOBS, job_states=states,
                  stored_jobs=len(stored), interpretation_rows=rows, cpus=os.cpu_count(),
                  stored_not_answered=len(set(stored) - set(answered)),
                  answered_not_stored=len(set(answered) - set(stored)),
                  completion_s=round((finished[1] - finished[0]).total_seconds(), 2) if finished[1] else None)
    if report["completion_s"]:
        report["jobs_completed_per_s"] = round(states.get("succeeded", 0) / report["completion_s"], 2)
    artifacts = Path(os.environ.get("SELFIE_ARTIFACTS_DIR", ROOT / "artifacts"))
    path = write_json(artifacts / f"load_submit_{kind}.json", report)
    print("\nload test:", json.dumps(report, indent=1), "\nwritten to", path)

    assert not [code for code in result.statuses if code >= 500], (report, api_log[-3000:])
    assert not result.errors, report
    assert set(result.statuses) <= {202}, report  # every key unique: no replay (200), nothing refused
    assert len(result.outcomes) == sum(result.statuses.values()), report
    assert answered and stored == answered, report  # every 202 is a stored job, and every stored job got its 202
    assert not refused & set(stored), report
    assert states == {"succeeded": len(stored)}, (report, worker_log[-3000:])
    assert rows == distinct == result.interpretations, report
