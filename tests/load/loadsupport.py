"""The whole service as separate processes on loopback, and an asyncio load generator, for the load test and
`benchmarks/e2e_bench.py`: one uvicorn API process, one worker process, real Redis, SQLite or PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.integration.worker_support import stop_process_group, wait_for

ROOT = Path(__file__).resolve().parents[2]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of `values`; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


class ServiceStack:
    """`python -m workers worker` + `uvicorn api.main:create_app --factory`, each in its own process group.

    The database must already be migrated; the worker writes the model card when its model is loaded."""

    def __init__(self, tmp: Path, database_url: str, redis_url: str, model: str, *, model_path: Path | None = None,
                 batch_size: int | None = None, threads: int | None = None, env: dict[str, str] | None = None,
                 api_processes: int = 1) -> None:
        from tests import services

        self.tmp, self.database_url, self.redis_url, self.model = tmp, database_url, redis_url, model
        base = {k: v for k, v in os.environ.items() if not k.startswith("SELFIE_")}
        base.update(
            SELFIE_DATABASE_URL=database_url, SELFIE_REDIS_URL=redis_url, SELFIE_DATA_DIR=str(tmp),
            SELFIE_AUTH_ENABLED="false", SELFIE_DEFAULT_MODEL=model, SELFIE_HEARTBEAT_INTERVAL_SECONDS="2",
            PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
        )
        base.update(env or {})
        self.env = base
        self.port = services.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.logs = {name: tmp / f"{name}.log" for name in ("worker", "api")}
        self._files = {name: open(path, "wb") for name, path in self.logs.items()}  # noqa: SIM115 - closed in stop
        cmd = [sys.executable, "-m", "workers", "worker", "--model", model, "--loglevel", "WARNING",
               "--hostname", f"load-{uuid.uuid4().hex[:6]}@localhost"]
        if model_path is not None:
            cmd += ["--model-path", str(model_path)]
        if batch_size:
            cmd += ["--batch-size", str(batch_size)]
        if threads:
            cmd += ["--threads", str(threads)]
        self.worker = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=self._files["worker"],
                                       stderr=subprocess.STDOUT, start_new_session=True)
        self.api = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "api.main:create_app", "--factory", "--host", "127.0.0.1", "--port",
             str(self.port), "--log-level", "warning", "--workers", str(api_processes), "--backlog", "2048",
             # longer than the clients keep idle connections: no request meets a connection the server just closed
             "--timeout-keep-alive", "30"],
            cwd=ROOT, env=self.env, stdout=self._files["api"], stderr=subprocess.STDOUT, start_new_session=True)

    def log(self, name: str) -> str:
        self._files[name].flush()
        return self.logs[name].read_text(errors="replace")

    def wait_ready(self, timeout: float = 300, api_key: str | None = None) -> float:
        """Seconds until the worker's model is loaded and its heartbeat says ready (seen through the API)."""
        t0 = time.monotonic()
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        with httpx.Client(base_url=self.url, timeout=10, headers=headers) as http:
            def ready():
                for name, proc in (("worker", self.worker), ("api", self.api)):
                    if proc.poll() is not None:
                        raise RuntimeError(f"the {name} exited:\n" + self.log(name)[-4000:])
                try:
                    models = http.get("/v1/models").json()["models"]
                except (httpx.HTTPError, KeyError, ValueError):
                    return False
                return any(m["name"] == self.model and any(w["state"] == "ready" for w in m["workers"])
                           for m in models)

            wait_for(ready, timeout, what="the worker to be ready", interval=0.25)
        time.sleep(1.0)  # Celery starts consuming right after the ready heartbeat
        return time.monotonic() - t0

    def stop(self) -> None:
        for proc in (self.api, self.worker):
            stop_process_group(proc, 20)
        for fh in self._files.values():
            fh.close()

    def __enter__(self) -> ServiceStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class LoadResult:
    submitters: int
    seconds: float
    latencies_ms: list[float] = field(default_factory=list)  # every answered submit
    statuses: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)  # transport errors by type
    accepted: list[str] = field(default_factory=list)  # job ids
    # per request, by its idempotency key: (the submitter, the status, the job id answered or None)
    outcomes: dict[str, tuple[int, int, str | None]] = field(default_factory=dict)
    interpretations: int = 0
    wall_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        lat = self.latencies_ms
        return {
            "submitters": self.submitters,
            "duration_s": round(self.wall_s, 2),
            "requests": sum(self.statuses.values()) + sum(self.errors.values()),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "transport_errors": dict(self.errors),
            "accepted_jobs": len(self.accepted),
            "accepted_interpretations": self.interpretations,
            "submits_per_s": round(sum(self.statuses.values()) / self.wall_s, 2) if self.wall_s else None,
            "submit_latency_ms": {"p50": round(percentile(lat, 50), 1), "p90": round(percentile(lat, 90), 1),
                                  "p99": round(percentile(lat, 99), 1), "max": round(max(lat), 1) if lat else None},
        }


async def _submitter(n: int, client: httpx.AsyncClient, make_body: Callable[[int, int], dict], deadline: float,
                     think_s: float, budget: list[int], result: LoadResult,
                     headers: Callable[[int], dict[str, str]] | None) -> None:
    if think_s:  # start spread over one think time, not as one synchronized wave
        await asyncio.sleep(random.Random(n).uniform(0, think_s))
    i = 0
    while time.monotonic() < deadline and budget[0] > 0:
        budget[0] -= 1
        body = make_body(n, i)
        i += 1
        t0 = time.perf_counter()
        try:
            resp = await client.post("/v1/jobs", json=body, headers=headers(n) if headers else None)
        except httpx.HTTPError as exc:
            result.errors[type(exc).__name__] += 1
            continue
        result.latencies_ms.append((time.perf_counter() - t0) * 1000)
        result.statuses[resp.status_code] += 1
        job_id = None
        if resp.status_code in (200, 202):
            data = resp.json()
            job_id = data["id"]
            result.accepted.append(job_id)
            result.interpretations += data["total"]
        if body.get("idempotency_key"):
            result.outcomes[body["idempotency_key"]] = (n, resp.status_code, job_id)
        if think_s:
            await asyncio.sleep(think_s)


def run_load(url: str, make_body: Callable[[int, int], dict], *, submitters: int, seconds: float,
             think_s: float = 0.0, max_requests: int | None = None, timeout_s: float = 60.0,
             headers: Callable[[int], dict[str, str]] | None = None) -> LoadResult:
    """`submitters` concurrent clients, each submitting `make_body(submitter, i)` (with `headers(submitter)`) in
    a loop (pausing `think_s` after each answer) until `seconds` pass or `max_requests` were sent in all."""
    result = LoadResult(submitters=submitters, seconds=seconds)

    async def main() -> None:
        limits = httpx.Limits(max_connections=submitters, max_keepalive_connections=submitters, keepalive_expiry=2.0)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout_s) as client:
            deadline = time.monotonic() + seconds
            budget = [max_requests if max_requests is not None else 1 << 62]
            t0 = time.monotonic()
            await asyncio.gather(*(_submitter(n, client, make_body, deadline, think_s, budget, result, headers)
                                   for n in range(submitters)))
            result.wall_s = time.monotonic() - t0

    asyncio.run(main())
    return result


def wait_jobs_finished(database_url: str, timeout: float, *, poll: float = 1.0) -> dict[str, int]:
    """Poll the database (private to the run) until every job is in a final state or `timeout` passes; returns
    the count of jobs per state."""
    from sqlalchemy import func, select

    from selfie_jobs.db import session_scope
    from selfie_jobs.models import Job

    final = {"succeeded", "failed", "cancelled"}
    deadline = time.monotonic() + timeout
    while True:
        with session_scope(database_url) as s:
            states = dict(s.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        if set(states) <= final or time.monotonic() > deadline:
            return states
        time.sleep(poll)


def write_json(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    return path
