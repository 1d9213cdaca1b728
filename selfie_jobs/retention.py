"""Retention: finished jobs expire after their time to live, and a purge deletes them with everything hanging off them.

A job's time to live is, in this order, its own (`jobs.ttl_seconds`, from the request's `ttl_seconds`), its key's
(`api_keys.job_ttl_seconds`), or the settings' (`SELFIE_JOB_TTL_SECONDS`); none of them set keeps it for ever. The
key's and the settings' are read at purge time, so changing them applies to the jobs already stored that did not
ask for their own. A job expires `ttl` seconds after it finished (succeeded, failed or cancelled); a queued or
running job never expires, and no job is purged within a day of its submission (the daily quota counts those).

The purge (`purge_expired`; `selfie purge`, and beat every `purge_interval_seconds`) deletes, in transactions of
at most `purge_batch_rows` rows each so that no lock is held for long:
- audit runs whose jobs have all expired, once the run is closed: their findings, then the run and its job links
  in one transaction. A run goes whole or not at all, so its report never counts findings or jobs that are gone;
  until every job of a run has expired (and while it is open) none of its jobs is purged;
- expired jobs: their result rows (every kind's table), then the job with its prompts, vector inputs, chunks and
  the variant an edit job made (ON DELETE CASCADE) in one transaction, together with the engine runs none of whose
  jobs remain; once that has committed, the variant's files in the artifact store (`variants.remove_files`);
- engine runs that produced no rows, once every job they could have served is gone.
Every delete re-checks that its job is still expired, so a key's time to live raised meanwhile stops the purge of
its jobs. A purge cut short (a crash, a time limit) leaves a consistent database: the next one goes on where it
stopped, and a purge with nothing expired deletes nothing. Between its transactions an expiring job can be seen
with part of its rows; once its time is up that is all a client may count on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Float, and_, delete, exists, func, literal, select, true
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.functions import FunctionElement

from selfie_jobs.audit_models import FINAL_RUN_STATES, AuditFinding, AuditRun, AuditRunJob
from selfie_jobs.kinds import all_kinds
from selfie_jobs.models import ApiKey, EngineRun, Job, utcnow
from selfie_jobs.retry import unit_of_work
from selfie_jobs.states import FINAL_JOB_STATES
from selfie_jobs.submission import QUOTA_WINDOW
from selfie_jobs.variants import remove_files, store_root

log = logging.getLogger(__name__)

#: Jobs (and audit runs) picked per look-up; each is then purged in transactions of its own.
PICK = 50
#: Two purges at once would delete the same rows in their own orders and deadlock on PostgreSQL: each purge
#: transaction takes this advisory lock first (on SQLite one writer at a time holds anyway).
ADVISORY_LOCK_KEY = 0x5E1F1E_9E


class epoch_seconds(FunctionElement):
    """A timestamp column as seconds since 1970 (float), in the database's own arithmetic."""

    type = Float()
    inherit_cache = True


@compiles(epoch_seconds, "postgresql")
def _epoch_postgresql(element, compiler, **kw):
    return f"EXTRACT(EPOCH FROM {compiler.process(element.clauses, **kw)})"


@compiles(epoch_seconds, "sqlite")
def _epoch_sqlite(element, compiler, **kw):
    # SQLAlchemy stores UTC timestamps as 'YYYY-MM-DD HH:MM:SS.ffffff' text, which julianday() reads as UTC.
    return f"((julianday({compiler.process(element.clauses, **kw)}) - 2440587.5) * 86400.0)"


@dataclass
class PurgeReport:
    jobs: int = 0
    results: int = 0
    audit_runs: int = 0
    findings: int = 0
    engine_runs: int = 0

    def add(self, other: PurgeReport) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def time_to_live(default_seconds: int | None):
    """The SQL expression of a job's time to live in seconds (NULL: kept for ever)."""
    key_ttl = select(ApiKey.job_ttl_seconds).where(ApiKey.id == Job.owner_key_id).scalar_subquery()
    if default_seconds is None:
        return func.coalesce(Job.ttl_seconds, key_ttl)
    return func.coalesce(Job.ttl_seconds, key_ttl, literal(int(default_seconds)))


def expired(now: datetime, default_seconds: int | None):
    """The condition on `jobs` of a job past its time to live (a NULL time to live never matches)."""
    return and_(
        Job.state.in_(list(FINAL_JOB_STATES)),
        Job.finished_at.is_not(None),
        Job.created_at < now - QUOTA_WINDOW,
        epoch_seconds(Job.finished_at) + time_to_live(default_seconds) <= now.timestamp(),
    )


def _outside_live_runs():
    """A job of an audit run that still exists is purged with its run, not on its own."""
    return ~exists().where(AuditRun.id == Job.audit_run_id)


def expired_jobs(session: Session, now: datetime, default_seconds: int | None, limit: int = PICK) -> list[str]:
    return list(session.scalars(
        select(Job.id).where(expired(now, default_seconds), _outside_live_runs()).order_by(Job.id).limit(limit)))


def expired_runs(session: Session, now: datetime, default_seconds: int | None, *, among: list[int] | None = None,
                 limit: int | None = PICK) -> list[int]:
    """Closed audit runs with jobs, every one of which has expired (of `among`, when given)."""
    of_run = Job.audit_run_id == AuditRun.id
    query = (select(AuditRun.id)
             .where(AuditRun.state.in_(list(FINAL_RUN_STATES)), exists().where(of_run),
                    ~exists().where(of_run, ~expired(now, default_seconds)))
             .order_by(AuditRun.id).limit(limit))
    if among is not None:
        query = query.where(AuditRun.id.in_(among))
    return list(session.scalars(query))


def _serialise_purges(session: Session) -> None:
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_advisory_xact_lock(ADVISORY_LOCK_KEY)))


def _result_tables() -> list[Any]:
    return list(dict.fromkeys(kind.table for kind in all_kinds().values()))


def _delete_some(session: Session, table: Any, where: Any, batch: int) -> int:
    ids = select(table.id).where(where).limit(batch).scalar_subquery()
    return session.execute(delete(table).where(table.id.in_(ids)).execution_options(synchronize_session=False)).rowcount


def _purge_run(sessions: Callable[[], Session], run_id: int, still_expired: Callable[[Session], bool],
               batch: int, retry_seconds: float) -> PurgeReport:
    report = PurgeReport()

    def findings(session: Session) -> int:
        _serialise_purges(session)
        if not still_expired(session):
            return 0
        return _delete_some(session, AuditFinding, AuditFinding.run_id == run_id, batch)

    while (deleted := unit_of_work(sessions, findings, retry_seconds)):
        report.findings += deleted

    def run(session: Session) -> int:
        _serialise_purges(session)
        if not still_expired(session):
            return 0
        session.execute(delete(AuditRunJob).where(AuditRunJob.run_id == run_id))
        return session.execute(delete(AuditRun).where(AuditRun.id == run_id)).rowcount

    report.audit_runs += unit_of_work(sessions, run, retry_seconds)
    return report


def _purge_job(sessions: Callable[[], Session], job_id: str, now: datetime, default_seconds: int | None,
               batch: int, retry_seconds: float, artifacts: Path) -> PurgeReport:
    report = PurgeReport()
    still_expired = and_(Job.id == job_id, expired(now, default_seconds), _outside_live_runs())
    job_expired = exists().where(still_expired)
    engine_run_ids: set[str] = set()
    for table in _result_tables():
        def results(session: Session, table: Any = table) -> int:
            _serialise_purges(session)
            mine = and_(table.job_id == job_id, job_expired)
            # the engine runs that wrote these rows: deleted with the job when none of their jobs remains
            engine_run_ids.update(session.scalars(select(table.engine_run_id).where(mine).distinct()))
            return _delete_some(session, table, mine, batch)

        while (deleted := unit_of_work(sessions, results, retry_seconds)):
            report.results += deleted

    def job(session: Session) -> tuple[int, int]:
        _serialise_purges(session)
        # prompts, vector inputs, chunks (and any row written since) go by ON DELETE CASCADE
        gone = session.execute(delete(Job).where(still_expired)
                               .execution_options(synchronize_session=False)).rowcount
        return gone, (_delete_finished_engine_runs(session, engine_run_ids) if gone else 0)

    report.jobs, report.engine_runs = unit_of_work(sessions, job, retry_seconds)
    if report.jobs:
        # after the commit: a purge cut short before it leaves the row and its file, never a row without its file
        remove_files(artifacts, job_id)
    return report


def _delete_finished_engine_runs(session: Session, run_ids: set[str]) -> int:
    """Of `run_ids`, delete the engine runs none of whose jobs remains (an engine run may serve several jobs)."""
    if not run_ids:
        return 0
    runs = session.execute(select(EngineRun.id, EngineRun.job_ids).where(EngineRun.id.in_(sorted(run_ids)))).all()
    served = {job_id for _, job_ids in runs for job_id in job_ids or []}
    remaining = set(session.scalars(select(Job.id).where(Job.id.in_(sorted(served))))) if served else set()
    done = [run_id for run_id, job_ids in runs if not set(job_ids or []) & remaining]
    if done:
        session.execute(delete(EngineRun).where(EngineRun.id.in_(done)))
    return len(done)


def _purge_orphan_engine_runs(sessions: Callable[[], Session], batch: int, retry_seconds: float) -> int:
    """Engine runs that wrote no row (a failed or cancelled batch): a job exists before any engine run serves it,
    so a run that started before the oldest job remaining was created served none of the jobs that remain."""

    def unit(session: Session) -> int:
        _serialise_purges(session)
        oldest = session.scalar(select(func.min(Job.created_at)))
        where = EngineRun.started_at < oldest if oldest is not None else true()
        ids = select(EngineRun.id).where(where).limit(batch).scalar_subquery()
        return session.execute(delete(EngineRun).where(EngineRun.id.in_(ids))).rowcount

    total = 0
    while (deleted := unit_of_work(sessions, unit, retry_seconds)):
        total += deleted
    return total


def purge_expired(sessions: Callable[[], Session], settings: Any, *, now: datetime | None = None,
                  retry_seconds: float | None = None) -> PurgeReport:
    """Delete every expired job and what hangs off it (see the module's docstring); returns what was deleted."""
    now = now or utcnow()
    default = settings.job_ttl_seconds
    batch = settings.purge_batch_rows
    retry = settings.db_retry_seconds if retry_seconds is None else retry_seconds
    artifacts = store_root(settings)
    report = PurgeReport()
    done_runs: set[int] = set()
    while True:
        with sessions() as session:
            run_ids = [r for r in expired_runs(session, now, default) if r not in done_runs]
        if not run_ids:
            break
        for run_id in run_ids:
            done_runs.add(run_id)

            def still_expired(session: Session, run_id: int = run_id) -> bool:
                return bool(expired_runs(session, now, default, among=[run_id]))

            report.add(_purge_run(sessions, run_id, still_expired, batch, retry))
    skipped: set[str] = set()
    while True:
        with sessions() as session:
            job_ids = [j for j in expired_jobs(session, now, default, PICK + len(skipped)) if j not in skipped]
        if not job_ids:
            break
        for job_id in job_ids:
            part = _purge_job(sessions, job_id, now, default, batch, retry, artifacts)
            if not part.jobs:
                skipped.add(job_id)  # no longer expired (its key's time to live was raised): not picked again
            report.add(part)
    report.engine_runs += _purge_orphan_engine_runs(sessions, batch, retry)
    if any(report.as_dict().values()):
        log.info("purge: deleted %s", report.as_dict())
    return report


def count_expired(session: Session, settings: Any, *, now: datetime | None = None) -> dict[str, int]:
    """What a purge would delete now, counted without deleting: jobs on their own, audit runs (with their jobs)."""
    now = now or utcnow()
    default = settings.job_ttl_seconds
    jobs = session.scalar(select(func.count()).select_from(Job).where(expired(now, default), _outside_live_runs()))
    runs = expired_runs(session, now, default, limit=None)
    run_jobs = session.scalar(select(func.count()).select_from(Job).where(Job.audit_run_id.in_(runs))) if runs else 0
    return {"jobs": int(jobs or 0) + int(run_jobs or 0), "audit_runs": len(runs)}
