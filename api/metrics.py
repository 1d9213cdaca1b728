"""`/metrics` in the Prometheus text format, computed at scrape time from the database and Redis.

Nothing is counted in the api process itself (several api processes would each hold a part): every figure is read
from the shared state when Prometheus asks, so any api replica answers the same.

- `selfie_queue_depth{model}`: messages waiting in the model's Celery queue (Redis LLEN of each priority list).
- `selfie_jobs{state}`, `selfie_chunks{state}`, `selfie_audit_runs{state}`: rows by state.
- `selfie_interpretations_total`: interpretations stored so far (sum of the jobs' progress counters).
- `selfie_interpretations_per_second`: over the last `window` seconds, from finished chunks.
- `selfie_chunk_latency_seconds`: a gauge histogram of the run time of chunks finished in the last 5 minutes,
  and `selfie_chunk_latency_recent_seconds{quantile}`.
- `selfie_worker_up{worker,model,device}`, `selfie_worker_gpu_memory_bytes{worker,model,device,kind}` and
  `selfie_worker_rows_served{...}`: from the live workers' heartbeats (`workers` table).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeHistogramMetricFamily, GaugeMetricFamily, Metric
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from selfie_jobs.audit_models import AuditRun
from selfie_jobs.liveness import live_workers
from selfie_jobs.chunks import as_utc
from selfie_jobs.models import Chunk, Job, ServedModel, Worker, utcnow
from selfie_jobs.queue import BROKER_TRANSPORT_OPTIONS, CONTROL_QUEUE, model_queue
from selfie_jobs.states import ChunkState, JobState

log = logging.getLogger(__name__)
router = APIRouter(include_in_schema=True, tags=["health"])

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)
LATENCY_WINDOW_S = 300
RATE_WINDOW_S = 60
MAX_CHUNKS_SAMPLED = 10_000


def queue_lists(queue: str) -> list[str]:
    """The Redis lists kombu keeps for one queue: the name itself, then `name<sep><step>` per priority step."""
    sep = BROKER_TRANSPORT_OPTIONS.get("sep", ":")
    steps = BROKER_TRANSPORT_OPTIONS.get("priority_steps", [0])
    return [queue if step == steps[0] else f"{queue}{sep}{step}" for step in steps]


def queue_depth(redis_client: Any, queue: str) -> int:
    pipe = redis_client.pipeline(transaction=False)
    for name in queue_lists(queue):
        pipe.llen(name)
    return int(sum(pipe.execute()))


class SelfieCollector:
    """Reads everything at collect() time; a failing source is reported as down, never as an error page."""

    def __init__(self, sessions: Callable[[], Session], redis_client: Callable[[], Any] | None,
                 worker_alive_seconds: float) -> None:
        self.sessions = sessions
        self.redis_client = redis_client
        self.worker_alive_seconds = worker_alive_seconds

    def describe(self) -> list[Metric]:
        return []  # collected lazily; no describe-time database access

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        db_up = GaugeMetricFamily("selfie_database_up", "1 when the database answered this scrape")
        try:
            with self.sessions() as session:
                metrics = list(self._from_db(session))
            db_up.add_metric([], 1)
        except Exception:  # noqa: BLE001 - a scrape must answer even when the database does not
            log.exception("metrics: database unavailable")
            metrics = []
            self._models = []
            db_up.add_metric([], 0)
        yield db_up
        yield from metrics
        yield from self._queues()
        took = GaugeMetricFamily("selfie_metrics_scrape_seconds", "Time spent computing this scrape")
        took.add_metric([], time.perf_counter() - started)
        yield took

    # -- database ----------------------------------------------------------------------------------------------
    def _from_db(self, session: Session) -> Iterator[Metric]:
        now = utcnow()
        self._models = sorted(
            set(session.scalars(select(ServedModel.name)))
            | set(session.scalars(select(Worker.model).distinct()))
            | set(session.scalars(select(Job.model).where(Job.state.in_([JobState.QUEUED, JobState.RUNNING]))
                                  .distinct()))
        )

        for name, model_cls, states, help_text in (
            ("selfie_jobs", Job, list(JobState), "Jobs by state"),
            ("selfie_chunks", Chunk, list(ChunkState), "Chunks by state"),
            ("selfie_audit_runs", AuditRun, ["pending", "submitting", "running", "succeeded", "failed", "cancelled"],
             "Audit runs by state"),
        ):
            counts = dict(session.execute(select(model_cls.state, func.count()).group_by(model_cls.state)).all())
            g = GaugeMetricFamily(name, help_text, labels=["state"])
            for state in states:
                g.add_metric([str(state)], int(counts.get(str(state), 0)))
            yield g

        total = session.scalar(select(func.coalesce(func.sum(Job.done), 0))) or 0
        c = CounterMetricFamily("selfie_interpretations", "Interpretations stored (all jobs)")
        c.add_metric([], float(total))
        yield c

        recent = session.scalar(
            select(func.coalesce(func.sum(Chunk.size), 0)).where(
                Chunk.state == ChunkState.DONE, Chunk.finished_at >= now - timedelta(seconds=RATE_WINDOW_S))
        ) or 0
        g = GaugeMetricFamily("selfie_interpretations_per_second",
                              f"Interpretations per second over the last {RATE_WINDOW_S} s (finished chunks)")
        g.add_metric([], float(recent) / RATE_WINDOW_S)
        yield g

        yield from self._latency(session, now)
        yield from self._workers(session, now)

    def _latency(self, session: Session, now) -> Iterator[Metric]:
        rows = session.execute(
            select(Chunk.started_at, Chunk.finished_at)
            .where(Chunk.state == ChunkState.DONE, Chunk.finished_at >= now - timedelta(seconds=LATENCY_WINDOW_S),
                   Chunk.started_at.is_not(None))
            .order_by(Chunk.finished_at.desc())
            .limit(MAX_CHUNKS_SAMPLED)
        ).all()
        values = sorted(max(0.0, (as_utc(f) - as_utc(s)).total_seconds()) for s, f in rows)
        buckets = []
        for bound in LATENCY_BUCKETS:
            buckets.append((str(bound), sum(1 for v in values if v <= bound)))
        buckets.append(("+Inf", len(values)))
        h = GaugeHistogramMetricFamily(
            "selfie_chunk_latency_seconds",
            f"Run time (claim to done) of the chunks finished in the last {LATENCY_WINDOW_S} s",
            buckets=buckets, gsum_value=sum(values),
        )
        yield h
        q = GaugeMetricFamily("selfie_chunk_latency_recent_seconds",
                              f"Quantiles of chunk run time over the last {LATENCY_WINDOW_S} s", labels=["quantile"])
        for quantile in (0.5, 0.9, 0.99):
            if values:
                q.add_metric([str(quantile)], values[min(len(values) - 1, int(quantile * len(values)))])
        yield q

    def _workers(self, session: Session, now) -> Iterator[Metric]:
        labels = ["worker", "model", "device"]
        up = GaugeMetricFamily("selfie_worker_up", "1 for each worker with a recent heartbeat", labels=labels)
        mem = GaugeMetricFamily("selfie_worker_gpu_memory_bytes", "GPU memory reported in the worker's heartbeat",
                                labels=[*labels, "kind"])
        rows = GaugeMetricFamily("selfie_worker_rows_served", "Interpretations served by the worker process",
                                 labels=labels)
        age = GaugeMetricFamily("selfie_worker_heartbeat_age_seconds", "Seconds since the worker's last heartbeat",
                                labels=labels)
        for w in live_workers(session, self.worker_alive_seconds, now=now):
            lv = [w.name, w.model, w.device]
            up.add_metric(lv, 1)
            age.add_metric(lv, max(0.0, (now - as_utc(w.last_heartbeat)).total_seconds()))
            info = w.info or {}
            if isinstance(info.get("rows_served"), (int, float)):
                rows.add_metric(lv, float(info["rows_served"]))
            gpu = info.get("gpu_memory")
            # one dict for a one-GPU worker, one per device for a worker spread over several
            for entry in gpu if isinstance(gpu, list) else [gpu]:
                if not isinstance(entry, dict):
                    continue
                where = [w.name, w.model, str(entry.get("device") or w.device)]
                for kind in ("allocated", "reserved", "free", "total"):
                    if isinstance(entry.get(kind), (int, float)):
                        mem.add_metric([*where, kind], float(entry[kind]))
        yield from (up, mem, rows, age)

    # -- redis -------------------------------------------------------------------------------------------------
    def _queues(self) -> Iterator[Metric]:
        redis_up = GaugeMetricFamily("selfie_redis_up", "1 when the broker answered this scrape")
        depth = GaugeMetricFamily("selfie_queue_depth", "Messages waiting in each model's queue (all priorities)",
                                  labels=["model"])
        control = GaugeMetricFamily("selfie_control_queue_depth", "Messages waiting in the control queue")
        if self.redis_client is None:
            redis_up.add_metric([], 0)
        else:
            try:
                client = self.redis_client()
                for model in getattr(self, "_models", []):
                    depth.add_metric([model], queue_depth(client, model_queue(model)))
                control.add_metric([], queue_depth(client, CONTROL_QUEUE))
                redis_up.add_metric([], 1)
            except Exception:  # noqa: BLE001 - the broker being down is a metric, not an error page
                log.warning("metrics: Redis unavailable", exc_info=True)
                redis_up.add_metric([], 0)
        yield from (redis_up, depth, control)


def install(app) -> None:
    """Register `/metrics` on `app` with a registry of its own (tests build many apps in one process)."""
    settings = app.state.settings
    client_holder: dict[str, Any] = {}

    def redis_client():
        if "client" not in client_holder:
            import redis

            from api.broker import DEFAULT_REDIS_URL

            client_holder["client"] = redis.Redis.from_url(
                settings.redis_url or DEFAULT_REDIS_URL, socket_connect_timeout=2, socket_timeout=2)
        return client_holder["client"]

    registry = CollectorRegistry(auto_describe=False)
    registry.register(SelfieCollector(app.state.sessionmaker, redis_client, settings.worker_alive_seconds))
    app.state.metrics_registry = registry
    app.include_router(router)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
def metrics(request: Request) -> Response:
    token = request.app.state.settings.metrics_token
    if token is not None:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.encode(), token.get_secret_value().encode()):
            return Response("metrics need the bearer token (SELFIE_METRICS_TOKEN)\n", status_code=401,
                            headers={"WWW-Authenticate": "Bearer"}, media_type="text/plain")
    return Response(generate_latest(request.app.state.metrics_registry), media_type=CONTENT_TYPE_LATEST)
