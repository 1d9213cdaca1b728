"""Scanning: the detectors run over a finished job's interpretations; findings are stored once per job.

The detector function is passed in (the worker builds it with `selfie_jobs.audit_detectors`), so scanning can be
tested with any function.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import Session

from selfie_jobs.audit_models import FINAL_RUN_STATES, AuditFinding, AuditRun, AuditRunJob, AuditRunState
from selfie_jobs.models import Interpretation, Job, Prompt, utcnow
from selfie_jobs.states import FINAL_JOB_STATES, JobState

#: (text, mean relevancy) -> hits, each with `.detector`, `.label`, `.match` (selfie_jobs.audit_detectors.Hit).
DetectFn = Callable[[str, float], Sequence[Any]]


def fingerprint(prompt: str, layer: int, token: int, detector: str, label: str) -> str:
    raw = "\x1f".join([prompt, str(layer), str(token), detector, label])
    return hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()


def jobs_to_scan(session: Session, run_id: int | None = None, limit: int = 50) -> list[int]:
    """Unscanned run jobs whose job has finished (oldest first)."""
    q = (
        select(AuditRunJob.id)
        .join(Job, Job.id == AuditRunJob.job_id)
        .join(AuditRun, AuditRun.id == AuditRunJob.run_id)
        .where(AuditRunJob.scanned.is_(False), Job.state.in_(list(FINAL_JOB_STATES)),
               AuditRun.state.in_([AuditRunState.SUBMITTING, AuditRunState.RUNNING]))
        .order_by(AuditRunJob.id)
        .limit(limit)
    )
    if run_id is not None:
        q = q.where(AuditRunJob.run_id == run_id)
    return list(session.scalars(q))


def scan_job(session: Session, run_job_id: int, detect: DetectFn, page: int = 2_000) -> int | None:
    """Run the detectors over one finished job of a run and store its findings (the caller commits).

    The "scanned" mark is a compare-and-set in the same transaction as the findings: a job is scanned once even if
    two drivers try at the same time. Returns the number of findings, or None when someone else scanned it.
    """
    won = session.execute(
        update(AuditRunJob).where(AuditRunJob.id == run_job_id, AuditRunJob.scanned.is_(False)).values(scanned=True)
    ).rowcount
    if won != 1:
        return None
    rj = session.get(AuditRunJob, run_job_id)
    prompts = {
        index: (text, len(tokens or []))
        for index, text, tokens in session.execute(
            select(Prompt.index, Prompt.text, Prompt.tokens).where(Prompt.job_id == rj.job_id)
        )
    }
    cols = (Interpretation.id, Interpretation.prompt_index, Interpretation.layer, Interpretation.token,
            Interpretation.source_token, Interpretation.text, Interpretation.mean_relevancy)
    last_id = 0
    total = 0
    scanned = 0
    while True:
        rows = session.execute(
            select(*cols).where(Interpretation.job_id == rj.job_id, Interpretation.id > last_id)
            .order_by(Interpretation.id).limit(page)
        ).all()
        if not rows:
            break
        last_id = rows[-1][0]
        scanned += len(rows)
        values = []
        seen: set[tuple] = set()
        for _id, p, layer, token, source_token, text, rel in rows:
            for hit in detect(text or "", float(rel or 0.0)):
                key = (p, layer, token, hit.detector, hit.label)
                if key in seen:
                    continue
                seen.add(key)
                prompt_text, n_tokens = prompts.get(p, ("", 0))
                values.append({
                    "run_id": rj.run_id, "job_id": rj.job_id, "prompt_index": p, "item_index": rj.prompt_offset + p,
                    "layer": layer, "token": token, "token_from_end": token - n_tokens, "source_token": source_token,
                    "detector": hit.detector[:200], "label": hit.label[:500], "match": hit.match, "text": text,
                    "mean_relevancy": float(rel or 0.0),
                    "fingerprint": fingerprint(prompt_text, layer, token, hit.detector, hit.label),
                })
        if values:
            session.execute(insert(AuditFinding), values)
            total += len(values)
    rj.flags = total
    session.execute(
        update(AuditRun).where(AuditRun.id == rj.run_id).values(
            jobs_scanned=AuditRun.jobs_scanned + 1,
            interpretations_scanned=AuditRun.interpretations_scanned + scanned,
            flags=AuditRun.flags + total,
        )
    )
    session.flush()
    return total


def refresh_run(session: Session, run_id: int) -> AuditRun:
    """Close a fully submitted run whose jobs are all scanned (the caller commits)."""
    run = session.get(AuditRun, run_id, populate_existing=True)
    if run.state == AuditRunState.RUNNING and run.jobs_scanned >= run.jobs_total:
        failed = session.scalar(
            select(func.count()).select_from(Job).where(Job.audit_run_id == run_id, Job.state != JobState.SUCCEEDED)
        ) or 0
        run.finished_at = utcnow()
        if run.jobs_total and failed == run.jobs_total:
            run.state = AuditRunState.FAILED
            run.error = "every job of the run failed"
        else:
            run.state = AuditRunState.SUCCEEDED
            if failed:
                run.error = f"{failed} of {run.jobs_total} jobs did not succeed; their results are partial"
        session.flush()
    return run


def run_progress(session: Session, run: AuditRun) -> dict[str, Any]:
    done, total = session.execute(
        select(func.coalesce(func.sum(Job.done), 0), func.coalesce(func.sum(Job.total), 0)).where(
            Job.audit_run_id == run.id
        )
    ).one()
    progress = {
        "prompts_total": run.prompts_total,
        "prompts_submitted": run.prompts_submitted,
        "prompts_skipped": run.prompts_skipped,
        "jobs_total": run.jobs_total,
        "jobs_scanned": run.jobs_scanned,
        "interpretations_done": int(done),
        "interpretations_total": int(total),
        "interpretations_scanned": int(run.interpretations_scanned or 0),
        "flags": run.flags,
        "fraction": (int(done) / int(total)) if total else (1.0 if run.state in FINAL_RUN_STATES else 0.0),
    }
    waiting = _waiting_for_the_tick(session, run)
    if waiting:
        progress["waiting"] = waiting
    return progress


def _waiting_for_the_tick(session: Session, run: AuditRun) -> str | None:
    """Why a running run whose jobs have all finished is still open: scanning and closing are the scheduler's
    (the audit tick of `selfie beat`), and a stack started without beat would show it open for good, unexplained."""
    if run.state != AuditRunState.RUNNING or run.prompts_submitted + run.prompts_skipped < run.prompts_total:
        return None
    open_jobs = session.scalar(
        select(func.count()).select_from(Job)
        .where(Job.audit_run_id == run.id, Job.state.not_in(list(FINAL_JOB_STATES)))
    )
    if open_jobs:
        return None
    return ("every job of the run has finished: the run is scanned and closed by the scheduler's next audit tick "
            "(`selfie beat`, every few seconds); if it stays open, check that beat is running")
