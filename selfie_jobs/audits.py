"""Audits: a model over a prompt set, on a schedule; each run fans out into ordinary jobs and is scanned.

Life of a run (the database holds every step, so a restarted worker or beat resumes where the last one stopped):

1. `start_run` writes a `pending` run with a snapshot of the audit's config.
2. `fan_out` (task `selfie.run_audit`) takes a lease on the run and walks the prompt set from its cursor
   (`prompts_submitted`): each batch of prompts becomes one job through the same submission path as
   `POST /v1/jobs` (validated against the model card, stored with its chunks, enqueued). The job, the run's record
   of it and the advanced cursor are one transaction, and the job carries an idempotency key per (run, batch), so
   a fan-out cut short anywhere resumes without losing or duplicating a batch.
3. `scan_job` runs the detectors over a finished job's interpretations (paged, bounded memory) and stores the
   findings together with the "scanned" mark in one transaction.
4. `refresh_run` closes the run once every job is submitted and scanned.

The detector function is passed in by the worker, which builds it from the run's configs with
`selfie_jobs.audit_detectors`, the registry the API validates those configs with.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

from croniter import CroniterBadDateError, croniter
from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from selfie_jobs.audit_models import (
    FINAL_RUN_STATES,
    OPEN_RUN_STATES,
    Audit,
    AuditRun,
    AuditRunJob,
    AuditRunState,
    PromptSet,
)
from selfie_jobs.audit_scan import (  # noqa: F401 - re-exported: the audit API of this package
    DetectFn,
    fingerprint,
    jobs_to_scan,
    refresh_run,
    run_progress,
    scan_job,
)
from selfie_jobs.audit_schemas import (  # noqa: F401 - re-exported
    AuditCreate,
    AuditOptions,
    AuditTargets,
    AuditUpdate,
    DetectorSpec,
    LastTokens,
    validate_cron,
)
from selfie_jobs.auth import LOCAL_PRINCIPAL, Principal, key_revoked
from selfie_jobs.chunks import as_utc
from selfie_jobs.errors import DomainError
from selfie_jobs.ids import INT_MAX, parse_id
from selfie_jobs.locking import lock_row
from selfie_jobs.models import ApiKey, Chunk, Job, utcnow
from selfie_jobs.prompt_sets import BUILTIN, ensure_builtin, iter_items
from selfie_jobs.queue import TaskSender
from selfie_jobs.settings import Settings
from selfie_jobs.specs import IndexRange, JobCreate, Targets, resolve_selector
from selfie_jobs.states import FINAL_JOB_STATES, ChunkState, JobState

AUDIT_TICK_TASK = "selfie.audit_tick"

log = logging.getLogger(__name__)

__all__ = [
    "AUDIT_TICK_TASK", "Audit", "AuditCreate", "AuditError", "AuditOptions", "AuditTargets",
    "AuditUpdate", "DetectFn", "DetectorSpec", "LastTokens", "audit_config", "cancel_run", "check_audit_name",
    "claim_due_audits", "claim_run", "create_audit", "fail_run", "fan_out", "fingerprint", "jobs_to_scan",
    "next_fire", "open_run", "refresh_run", "resolve_prompt_set", "run_progress", "runs_to_resume", "scan_job",
    "start_run", "stop_key_audits", "update_audit", "validate_cron",
]


class AuditError(DomainError):
    """An audit request the service refuses (a prompt set it may not use, a name taken)."""


# --- audits ---------------------------------------------------------------------------------------------------------


def next_fire(expr: str, after: datetime) -> datetime:
    return croniter(expr, as_utc(after)).get_next(datetime)


def resolve_prompt_set(session: Session, name_or_id: str | int, who: Principal = LOCAL_PRINCIPAL) -> PromptSet:
    """A built-in set or one `who` may see. Another key's set reads exactly like a missing one: an audit over it
    would hand its prompts to `who` through the jobs the runs fan out.

    By name: `who`'s own set, else the built-in one; an admin may name another key's set when only one has that
    name. An id is ASCII digits (as in a path); anything else is a name.
    """

    def usable(found: PromptSet | None) -> bool:
        return found is not None and (found.source == "builtin" or who.can_see(found.owner_key_id))

    set_id = name_or_id if isinstance(name_or_id, int) else parse_id(str(name_or_id))
    if set_id is not None:
        found = session.get(PromptSet, set_id) if 0 < set_id <= INT_MAX else None
        if usable(found):
            return found
    name = str(name_or_id)
    named = session.scalars(select(PromptSet).where(PromptSet.name == name).order_by(PromptSet.id)).all()
    own = [p for p in named if p.source != "builtin" and p.owner_key_id == who.key_id]
    builtin = [p for p in named if p.source == "builtin"]
    if own or builtin:
        return (own or builtin)[0]
    if name in BUILTIN:
        return ensure_builtin(session, name)
    others = [p for p in named if usable(p)]
    if len(others) == 1:
        return others[0]
    if len(others) > 1:
        raise AuditError(f"{len(others)} prompt sets of different keys are named {name!r}; give its id", status=409)
    raise AuditError(f"no prompt set {name_or_id!r}; upload one or use a built-in: {', '.join(BUILTIN)}", status=404)


def check_audit_name(session: Session, name: str, owner_key_id: int | None) -> None:
    """Audit names are unique per key: another key's audit of that name is not looked at (nor told of)."""
    owned = Audit.owner_key_id.is_(None) if owner_key_id is None else Audit.owner_key_id == owner_key_id
    if session.scalar(select(Audit.id).where(Audit.name == name, owned)) is not None:
        raise AuditError(f"an audit named {name!r} already exists", status=409)


def check_against_card(session: Session, model: str, targets: dict[str, Any], options: dict[str, Any],
                       settings: Settings) -> None:
    """Refuse, when the audit is defined, what its fan-out would refuse for every prompt: an unknown model, a layer
    or token index past the model, k past its blocks, options a job of this model may not have (AuditError 422,
    naming the field). Checked as one job of a one-token prompt, through the job submission's own checks."""
    from selfie_jobs.submission import SubmissionError, load_card, prepare_job

    try:
        card = load_card(session, model)
        tokens = targets.get("tokens", {"last": 1})
        context = card.max_context
        chosen = [tokens["last"]] if isinstance(tokens, dict) else [] if tokens == "all" else tokens
        for token in chosen:
            if isinstance(tokens, dict) and token > context:
                raise SubmissionError(f"last {token} tokens: {model!r} takes at most {context}", field="targets.tokens")
            if not isinstance(tokens, dict) and not -context <= token < context:
                raise SubmissionError(f"token {token} is out of range for {model!r}: prompts have at most {context} "
                                      f"tokens (valid are 0..{context - 1} or -{context}..-1)", field="targets.tokens")
        probe = JobCreate(model=model, prompts=["x"], targets=Targets(layers=targets.get("layers", "all"), tokens=[-1]),
                          **options)
        prepare_job(session, probe, settings)
    except SubmissionError as exc:
        where = f"{exc.field}: " if exc.field else ""
        raise AuditError(f"{where}{exc.message}", field=exc.field, status=exc.status) from None


def create_audit(session: Session, req: AuditCreate, settings: Settings, who: Principal = LOCAL_PRINCIPAL) -> Audit:
    """Store an audit owned by `who` over a prompt set `who` may use (the caller commits)."""
    check_audit_name(session, req.name, who.key_id)
    model = req.model or settings.default_model
    check_against_card(session, model, req.targets.model_dump(mode="json"),
                       req.options.model_dump(mode="json", exclude_none=True), settings)
    prompt_set = resolve_prompt_set(session, req.prompt_set, who)
    audit = Audit(
        name=req.name,
        model=model,
        prompt_set_id=prompt_set.id,
        targets=req.targets.model_dump(mode="json"),
        options=req.options.model_dump(mode="json", exclude_none=True),
        detectors=[d.checked() for d in req.detectors],
        schedule=req.schedule,
        enabled=req.enabled,
        owner_key_id=who.key_id,
        next_run_at=next_fire(req.schedule, utcnow()) if req.schedule and req.enabled else None,
    )
    session.add(audit)
    session.flush()
    return audit


def update_audit(session: Session, audit: Audit, req: AuditUpdate, settings: Settings) -> Audit:
    fields = req.model_fields_set
    if {"targets", "options"} & fields:
        targets = req.targets.model_dump(mode="json") if req.targets is not None else audit.targets
        options = req.options.model_dump(mode="json", exclude_none=True) if req.options is not None else audit.options
        check_against_card(session, audit.model, targets, options, settings)
    if "targets" in fields and req.targets is not None:
        audit.targets = req.targets.model_dump(mode="json")
    if "options" in fields and req.options is not None:
        audit.options = req.options.model_dump(mode="json", exclude_none=True)
    if "detectors" in fields and req.detectors is not None:
        audit.detectors = [d.checked() for d in req.detectors]
    if "schedule" in fields:
        audit.schedule = req.schedule or None
    if "enabled" in fields and req.enabled is not None:
        audit.enabled = req.enabled
    audit.next_run_at = next_fire(audit.schedule, utcnow()) if audit.schedule and audit.enabled else None
    session.flush()
    return audit


def stop_key_audits(session: Session, key_id: int) -> tuple[list[int], list[int]]:
    """A revoked key's audits: schedules stopped (disabled, no next run) and open runs cancelled with their jobs.
    Returns (audits whose schedule stopped, runs cancelled); the caller commits."""
    scheduled = list(session.scalars(select(Audit.id).where(
        Audit.owner_key_id == key_id, Audit.schedule.is_not(None), Audit.enabled.is_(True))))
    if scheduled:
        session.execute(update(Audit).where(Audit.id.in_(scheduled)).values(enabled=False, next_run_at=None))
    runs = session.scalars(select(AuditRun).join(Audit, Audit.id == AuditRun.audit_id).where(
        Audit.owner_key_id == key_id, AuditRun.state.in_(OPEN_RUN_STATES))).all()
    for run in runs:
        cancel_run(session, run)
    session.flush()
    return scheduled, [run.id for run in runs]


def audit_config(audit: Audit) -> dict[str, Any]:
    return {
        "model": audit.model,
        "prompt_set_id": audit.prompt_set_id,
        "targets": audit.targets,
        "options": audit.options,
        "detectors": audit.detectors,
    }


# --- runs -----------------------------------------------------------------------------------------------------------


def open_run(session: Session, audit_id: int) -> AuditRun | None:
    return session.scalars(
        select(AuditRun).where(AuditRun.audit_id == audit_id, AuditRun.state.in_(OPEN_RUN_STATES)).order_by(AuditRun.id)
    ).first()


def start_run(session: Session, audit: Audit, trigger: str = "manual") -> tuple[AuditRun, bool]:
    """A new pending run, or the audit's open one (runs of one audit never overlap). The caller commits.

    The audit's row is held until then, so a manual start and the beat's cannot both find no open run and insert one.
    """
    lock_row(session, Audit, audit.id)
    existing = open_run(session, audit.id)
    if existing is not None:
        return existing, False
    prompt_set = session.get(PromptSet, audit.prompt_set_id)
    run = AuditRun(
        audit_id=audit.id,
        state=AuditRunState.PENDING,
        trigger=trigger,
        config=audit_config(audit),
        prompts_total=prompt_set.size if prompt_set else 0,
        created_at=utcnow(),
    )
    session.add(run)
    session.flush()
    return run, True


def claim_due_audits(session: Session, now: datetime | None = None) -> list[int]:
    """Audits whose schedule fired: advance `next_run_at` with a compare-and-set (one beat wins) and return them."""
    now = now or utcnow()
    live_keys = select(ApiKey.id).where(ApiKey.revoked_at.is_(None))
    due = session.execute(
        select(Audit.id, Audit.schedule, Audit.next_run_at).where(
            Audit.enabled.is_(True), Audit.schedule.is_not(None), Audit.next_run_at <= now,
            # a revoked key's schedule never fires, whatever its row says (one stored before revoking stopped it)
            or_(Audit.owner_key_id.is_(None), Audit.owner_key_id.in_(live_keys)),
        )
    ).all()
    won = []
    for audit_id, schedule, fired_at in due:
        try:
            following = next_fire(schedule, now)
        except (CroniterBadDateError, ValueError):
            # stored before schedules were checked to fire: stop it (this fire still runs) rather than fail the tick
            log.warning("audit %s: schedule %r never fires again; its schedule is stopped", audit_id, schedule)
            following = None
        result = session.execute(
            update(Audit)
            .where(Audit.id == audit_id, Audit.next_run_at == fired_at)
            .values(next_run_at=following)
        )
        if result.rowcount == 1:
            won.append(audit_id)
    session.flush()
    return won


def claim_run(session: Session, run_id: int, owner: str, lease_seconds: float, now: datetime | None = None) -> bool:
    """Take the fan-out lease of a pending/submitting run whose lease is free or expired (compare-and-set)."""
    now = now or utcnow()
    result = session.execute(
        update(AuditRun)
        .where(
            AuditRun.id == run_id,
            AuditRun.state.in_([AuditRunState.PENDING, AuditRunState.SUBMITTING]),
            or_(AuditRun.owner.is_(None), AuditRun.owner == owner, AuditRun.lease_expires_at < now),
        )
        .values(owner=owner, lease_expires_at=now + timedelta(seconds=lease_seconds), state=AuditRunState.SUBMITTING,
                started_at=func.coalesce(AuditRun.started_at, now))
    )
    session.flush()
    return result.rowcount == 1


def runs_to_resume(session: Session, now: datetime | None = None) -> list[int]:
    """Runs not fully fanned out whose driver is gone (lease expired) or that never started."""
    now = now or utcnow()
    return list(
        session.scalars(
            select(AuditRun.id).where(
                AuditRun.state.in_([AuditRunState.PENDING, AuditRunState.SUBMITTING]),
                or_(AuditRun.lease_expires_at.is_(None), AuditRun.lease_expires_at < now),
            )
        )
    )


def _token_selection(tokens: Any, n_tokens: int) -> Any:
    """The job-level token selector for one prompt of `n_tokens` tokens, or None when nothing is left."""
    if tokens == "all":
        return "all"
    if isinstance(tokens, dict) and "last" in tokens:
        n = min(int(tokens["last"]), n_tokens)
        return ("last", n)
    chosen = tuple(t for t in tokens if -n_tokens <= t < n_tokens)
    return chosen or None


def _job_tokens(sel: Any) -> Any:
    if sel == "all":
        return "all"
    if isinstance(sel, tuple) and sel and sel[0] == "last":
        return IndexRange(start=-sel[1])
    return list(sel)


def _job_request(config: dict[str, Any], prompts: list[str], token_sel: Any, key: str) -> JobCreate:
    options = dict(config.get("options") or {})
    return JobCreate(
        model=config["model"],
        prompts=prompts,
        targets=Targets(layers=config["targets"].get("layers", "all"), tokens=_job_tokens(token_sel)),
        idempotency_key=key,
        **options,
    )


def _plan(session: Session, config: dict[str, Any], start: int, settings: Settings) -> Iterator[tuple[int, int, list[str], Any, int]]:
    """Batches from the prompt set cursor: (first index, next cursor, prompts, token selection, skipped before).

    A batch holds consecutive prompts with the same token selection, within the per-job caps; a prompt the model
    cannot take (too long) is skipped and ends the batch, so job prompt i is always prompt set item offset + i.
    """
    from selfie_jobs.cards import card_tokenizer, load_card

    card = load_card(session, config["model"])
    tokenizer = card_tokenizer(card)
    layers = resolve_selector(_layer_selector(config["targets"].get("layers", "all")), card.num_layers + 1, "layer")
    n_layers = max(1, len(layers))
    tokens_spec = config["targets"].get("tokens", {"last": 1})
    cap_items = settings.max_interpretations_per_job
    cap_prompts = settings.max_prompts_per_job

    batch: list[str] = []
    first = start
    sel: Any = None
    items = 0
    skipped = 0
    source = iter_items(session, config["prompt_set_id"], start=start)
    while True:
        page = [row for _, row in zip(range(500), source)]
        if not page:
            break
        encodings = tokenizer.encode_batch([text for _, text in page])
        for (index, text), enc in zip(page, encodings, strict=True):
            n_tokens = len(enc.ids)
            this_sel = _token_selection(tokens_spec, n_tokens) if n_tokens else None
            if this_sel is None or n_tokens > card.max_context or len(text) > settings.max_prompt_chars:
                if batch:
                    yield first, index, batch, sel, skipped
                    batch, items, skipped = [], 0, 0
                skipped += 1
                continue
            per_prompt = n_layers * _count_tokens(this_sel, n_tokens)
            if batch and (this_sel != sel or items + per_prompt > cap_items or len(batch) >= cap_prompts):
                yield first, index, batch, sel, skipped
                batch, items, skipped = [], 0, 0
            if not batch:
                first, sel = index, this_sel
            batch.append(text)
            items += per_prompt
            cursor = index + 1
    if batch:
        yield first, cursor, batch, sel, skipped
    elif skipped:
        yield start, _set_size(session, config["prompt_set_id"]), [], None, skipped


def _count_tokens(sel: Any, n_tokens: int) -> int:
    if sel == "all":
        return n_tokens
    if sel[0] == "last":
        return sel[1]
    return len(sel)


def _set_size(session: Session, prompt_set_id: int) -> int:
    prompt_set = session.get(PromptSet, prompt_set_id)
    return prompt_set.size if prompt_set else 0


def _layer_selector(layers: Any) -> Any:
    return IndexRange(**layers) if isinstance(layers, dict) else layers


def fan_out(
    session_factory: Callable[[], Session],
    run_id: int,
    settings: Settings,
    sender: TaskSender,
    owner: str,
    *,
    lease_seconds: float | None = None,
    stop_after: int | None = None,
) -> AuditRun:
    """Submit the run's remaining prompts as jobs; resumable at any point. `stop_after` (tests) stops early."""
    from selfie_jobs.submission import (SubmissionError, check_quota, enqueue_chunks, idempotency_scope, prepare_job,
                                        store_job)

    lease = lease_seconds or float(settings.lease_seconds)
    with session_factory() as session:
        if not claim_run(session, run_id, owner, lease):
            session.rollback()
            return session.get(AuditRun, run_id)
        session.commit()
        run = session.get(AuditRun, run_id)
        audit = session.get(Audit, run.audit_id)
        config = run.config
        if key_revoked(session, audit.owner_key_id if audit else None):
            return _fail_committed(session, run_id, "the audit's API key was revoked")
        if not _owner_may_use(session, audit, config["prompt_set_id"]):
            # an audit stored before create_audit checked this: its jobs would show another key's prompts
            return _fail_committed(session, run_id, f"this audit's key may not use prompt set "
                                                     f"{config['prompt_set_id']}, which belongs to another key")
        done_batches = 0
        try:
            for first, cursor, prompts, sel, skipped in _plan(session, config, run.prompts_submitted, settings):
                if stop_after is not None and done_batches >= stop_after:
                    return run
                run = session.get(AuditRun, run_id, populate_existing=True)
                if run.state != AuditRunState.SUBMITTING or run.owner != owner:
                    return run  # cancelled, or another driver took over after our lease ran out
                chunks: list[Chunk] = []
                job = None
                if prompts:
                    batch = run.jobs_total
                    req = _job_request(config, prompts, sel, f"audit-run-{run_id}-batch-{batch}")
                    prepared = prepare_job(session, req, settings)
                    owner_key_id = audit.owner_key_id if audit else None
                    # the audit's jobs are its owner's jobs: they count against the owner's daily quota too
                    check_quota(session, owner_key_id, len(prepared.items), settings)
                    job, chunks = store_job(session, prepared, req, owner_key_id, settings,
                                            idempotency_scope(None, req.idempotency_key))
                    job.audit_run_id = run_id
                    session.add(AuditRunJob(run_id=run_id, batch=batch, job_id=job.id, prompt_offset=first,
                                            prompt_count=len(prompts)))
                    run.jobs_total = batch + 1
                run.prompts_submitted = cursor
                run.prompts_skipped = (run.prompts_skipped or 0) + skipped
                run.lease_expires_at = utcnow() + timedelta(seconds=lease)
                try:
                    session.commit()
                except IntegrityError:
                    session.rollback()  # a concurrent driver stored this batch: re-read and stop
                    return session.get(AuditRun, run_id, populate_existing=True)
                if job is not None:
                    enqueue_chunks(session, sender, chunks, job.model, job.priority)
                done_batches += 1
        except SubmissionError as exc:
            session.rollback()
            return _fail_committed(session, run_id, f"a batch was refused: {exc.message}")
        except OperationalError:
            raise  # the database is unreachable: the run keeps its cursor, and the next driver resumes it
        except Exception as exc:  # noqa: BLE001 - stored as the run's error and logged, not swallowed
            # Anything else (a target the model no longer has, a prompt set gone) fails the same way on every
            # retry: the run would stay `submitting` and block every later run of its audit.
            log.exception("audit run %s: the fan-out failed", run_id)
            session.rollback()
            return _fail_committed(session, run_id, f"the fan-out failed: {type(exc).__name__}: {exc}")
        run = session.get(AuditRun, run_id, populate_existing=True)
        if run.state == AuditRunState.SUBMITTING and run.owner == owner:
            run.state = AuditRunState.RUNNING
            run.owner = None
            run.lease_expires_at = None
            session.commit()
        return run


def _fail_committed(session: Session, run_id: int, error: str) -> AuditRun:
    run = fail_run(session, run_id, error)
    session.commit()
    return run


def _owner_may_use(session: Session, audit: Audit | None, prompt_set_id: int) -> bool:
    """Whether the audit's key may see the prompt set, by the rule the API applies to a caller."""
    prompt_set = session.get(PromptSet, prompt_set_id)
    owner_key_id = audit.owner_key_id if audit else None
    if prompt_set is None or prompt_set.source == "builtin" or owner_key_id is None:
        return True  # a missing set fails in the plan; without an owner the audit is the local (admin) user's
    key = session.get(ApiKey, owner_key_id)
    return key is not None and Principal(key_id=owner_key_id, is_admin=key.is_admin).can_see(prompt_set.owner_key_id)


def fail_run(session: Session, run_id: int, error: str) -> AuditRun:
    """Close the run as failed with ``error`` and cancel its open jobs (the caller commits)."""
    run = session.get(AuditRun, run_id, populate_existing=True)
    run.state = AuditRunState.FAILED
    run.error = error
    run.finished_at = utcnow()
    _cancel_open_jobs(session, run_id)
    session.flush()
    return run


def _cancel_open_jobs(session: Session, run_id: int) -> None:
    now = utcnow()
    open_jobs = select(Job.id).where(Job.audit_run_id == run_id, Job.state.not_in(list(FINAL_JOB_STATES)))
    session.execute(
        update(Chunk)
        .where(Chunk.job_id.in_(open_jobs), Chunk.state.in_([ChunkState.QUEUED, ChunkState.RUNNING]))
        .values(state=ChunkState.CANCELLED, finished_at=now)
    )
    session.execute(
        update(Job)
        .where(Job.audit_run_id == run_id, Job.state.not_in(list(FINAL_JOB_STATES)))
        .values(state=JobState.CANCELLED, finished_at=now)
    )


def cancel_run(session: Session, run: AuditRun) -> AuditRun:
    if run.state in FINAL_RUN_STATES:
        return run
    run.state = AuditRunState.CANCELLED
    run.finished_at = utcnow()
    run.owner = None
    _cancel_open_jobs(session, run.id)
    session.flush()
    return run
