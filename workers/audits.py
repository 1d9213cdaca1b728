"""Audit tasks: `selfie.run_audit` (fan a run out into jobs) and `selfie.audit_tick` (beat: cron driver, resume,
scan finished jobs, close runs). Thin wrappers over `selfie_jobs.audits`; the detectors are `selfie_jobs.audit_detectors`.

Both task bodies are plain functions (`run_audit`, `audit_tick`) callable without Celery, and both are safe to run
twice or concurrently: every step is a compare-and-set on a database row.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from celery import Celery
from sqlalchemy import select
from sqlalchemy.orm import Session

from selfie_jobs import audit_detectors as detectors
from selfie_jobs import audits as A
from selfie_jobs.audit_detectors import DetectorTimeout
from selfie_jobs.audit_models import AuditRun, AuditRunJob, AuditRunState
from selfie_jobs.chunks import as_utc
from selfie_jobs.models import utcnow
from selfie_jobs.queue import CONTROL_QUEUE, RUN_AUDIT_TASK, TaskSender
from selfie_jobs.settings import Settings

log = logging.getLogger(__name__)

#: Upper bound of the audit tick period (seconds); it runs at the reconciler's cadence when that is shorter.
#: Cron resolution is a minute, so twice a minute is enough.
TICK_SECONDS = 30.0
#: Jobs scanned per tick (each is one transaction; the next tick continues).
SCAN_PER_TICK = 200


def driver_name() -> str:
    return f"audits@{socket.gethostname()}:{os.getpid()}"


def detect_fn(configs: list[dict[str, Any]]) -> A.DetectFn:
    built = detectors.build_all(configs)
    return lambda text, relevancy: detectors.detect(built, text, relevancy)


def run_audit(
    sessions: Callable[[], Session],
    settings: Settings,
    sender: TaskSender,
    audit_id: int,
    run_id: int | None = None,
    *,
    owner: str | None = None,
    trigger: str = "manual",
) -> dict[str, Any]:
    """Fan out `run_id` (or a new run of `audit_id`), then scan whatever of it is already finished."""
    owner = owner or driver_name()
    with sessions() as session:
        if run_id is None:
            audit = session.get(A.Audit, audit_id)
            if audit is None:
                return {"audit_id": audit_id, "skipped": "no such audit"}
            run, _ = A.start_run(session, audit, trigger)
            session.commit()
            run_id = run.id
        run = session.get(AuditRun, run_id)
        if run is None:
            return {"run_id": run_id, "skipped": "no such run"}
        try:
            detect_fn(run.config.get("detectors") or [])
        except Exception as exc:  # noqa: BLE001 - the run records it: a config that cannot build never will
            log.exception("audit run %s: its detectors cannot be built", run_id)
            run = A.fail_run(session, run_id, f"detectors: {exc}")
            session.commit()
            return {"run_id": run_id, "state": run.state, "error": run.error}
    run = A.fan_out(sessions, run_id, settings, sender, owner)
    scanned = scan_ready(sessions, run_id=run_id)
    log.info("audit run %s: %s, %d/%d prompts submitted in %d jobs", run_id, run.state, run.prompts_submitted,
             run.prompts_total, run.jobs_total)
    return {"run_id": run_id, "state": run.state, "jobs": run.jobs_total, "scanned": scanned}


def scan_ready(sessions: Callable[[], Session], *, run_id: int | None = None, limit: int = SCAN_PER_TICK) -> int:
    """Scan finished jobs of open runs (one transaction each), then close runs that are complete."""
    cache: dict[int, A.DetectFn] = {}
    failed: set[int] = set()
    scanned = 0
    with sessions() as session:
        for rj_id in A.jobs_to_scan(session, run_id, limit=limit):
            rj = session.get(AuditRunJob, rj_id)
            rid = rj.run_id
            if rid in failed:
                continue
            # A run whose detectors cannot scan a job fails at once, with the reason: left open, its oldest job
            # would come first in every tick and hold up the scanning of every other run.
            try:
                if rid not in cache:
                    cache[rid] = detect_fn(session.get(AuditRun, rid).config.get("detectors") or [])
                if A.scan_job(session, rj_id, cache[rid]) is not None:
                    scanned += 1
                session.commit()
            except (ValueError, DetectorTimeout) as exc:  # a config error or a pattern past its time
                session.rollback()
                log.warning("audit run %s failed while scanning: %s", rid, exc)
                A.fail_run(session, rid, f"scanning: {exc}")
                session.commit()
                failed.add(rid)
        open_runs = select(AuditRun.id).where(AuditRun.state == AuditRunState.RUNNING)
        if run_id is not None:
            open_runs = open_runs.where(AuditRun.id == run_id)
        for rid in list(session.scalars(open_runs)):
            A.refresh_run(session, rid)
            session.commit()
    return scanned


def audit_tick(
    sessions: Callable[[], Session],
    settings: Settings,
    sender: TaskSender,
    *,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Beat's audit work: start runs whose cron fired, re-send stalled fan-outs, scan finished jobs, close runs."""
    now = now or utcnow()
    started: list[int] = []
    resumed: list[int] = []
    with sessions() as session:
        for audit_id in A.claim_due_audits(session, now):
            run, created = A.start_run(session, session.get(A.Audit, audit_id), "schedule")
            if created:
                started.append(run.id)
        session.commit()
        grace = timedelta(seconds=settings.enqueue_grace_seconds)
        for rid in A.runs_to_resume(session, now):
            run = session.get(AuditRun, rid)
            if run.id in started or (run.state == AuditRunState.PENDING and run.lease_expires_at is None
                                     and as_utc(run.created_at) > now - grace):
                continue  # its own message is (probably) still on the way
            resumed.append(rid)
        audit_of = {rid: session.get(AuditRun, rid).audit_id for rid in started + resumed}
    for rid in started + resumed:
        try:
            sender.send_task(RUN_AUDIT_TASK, args=[audit_of[rid]], kwargs={"run_id": rid}, queue=CONTROL_QUEUE)
        except Exception:  # noqa: BLE001 - the next tick tries again
            log.exception("could not send the fan-out of audit run %s", rid)
    scanned = scan_ready(sessions)
    return {"started": started, "resumed": resumed, "scanned": scanned}


def tick_seconds(settings: Settings) -> float:
    return min(TICK_SECONDS, float(settings.reconcile_interval_seconds))


def beat_entries(settings: Settings) -> dict[str, dict[str, Any]]:
    """The beat schedule entry of the audit tick (merged into the Celery app's beat_schedule)."""
    period = tick_seconds(settings)
    return {
        "audit-tick": {
            "task": A.AUDIT_TICK_TASK,
            "schedule": period,
            # A tick that waited longer than two periods is stale: the next one does the same work.
            "options": {"queue": CONTROL_QUEUE, "expires": period * 2},
        }
    }


def register_audit_tasks(app: Celery, settings: Settings, sessions: Callable[[], Session] | None = None) -> None:
    """Register `selfie.run_audit` and `selfie.audit_tick` on a worker's Celery app (control queue)."""
    if sessions is None:
        from selfie_jobs.db import get_sessionmaker

        def sessions() -> Session:
            return get_sessionmaker(settings.resolved_database_url())()

    @app.task(name=RUN_AUDIT_TASK, ignore_result=True, acks_late=True)
    def run_audit_task(audit_id: int, run_id: int | None = None) -> dict[str, Any]:
        return run_audit(sessions, settings, app, int(audit_id), int(run_id) if run_id is not None else None)

    @app.task(name=A.AUDIT_TICK_TASK, ignore_result=True, soft_time_limit=300, time_limit=360)
    def audit_tick_task() -> dict[str, Any]:
        return audit_tick(sessions, settings, app)
