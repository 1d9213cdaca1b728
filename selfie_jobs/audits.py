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

This module never imports the engine: the detector function is passed in by the worker
(`selfie_core.detectors`), and the API validates detector configs by shape only.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

from croniter import croniter
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from selfie_jobs.audit_models import (
    FINAL_RUN_STATES,
    OPEN_RUN_STATES,
    Audit,
    AuditFinding,
    AuditRun,
    AuditRunJob,
    AuditRunState,
    PromptSet,
)
from selfie_jobs.chunks import as_utc
from selfie_jobs.models import Chunk, Interpretation, Job, Prompt, utcnow
from selfie_jobs.prompt_sets import BUILTIN, ensure_builtin, iter_items
from selfie_jobs.queue import TaskSender
from selfie_jobs.settings import Settings
from selfie_jobs.specs import Decoding, IndexRange, JobCreate, Targets, Template, resolve_selector
from selfie_jobs.states import FINAL_JOB_STATES, ChunkState, JobState

AUDIT_TICK_TASK = "selfie.audit_tick"
#: Detector kinds the core registry ships (checked against `selfie_core.detectors.kinds()` by a test).
KNOWN_DETECTOR_KINDS = ("concepts", "keywords", "regex")
_REQUIRED_FIELD = {"keywords": "words", "regex": "patterns", "concepts": "concepts"}

#: (text, mean relevancy) -> hits, each with `.detector`, `.label`, `.match` (selfie_core.detectors.Hit).
DetectFn = Callable[[str, float], Sequence[Any]]


class AuditError(Exception):
    def __init__(self, message: str, *, status: int = 422):
        super().__init__(message)
        self.message = message
        self.status = status


# --- schemas --------------------------------------------------------------------------------------------------------


class LastTokens(BaseModel):
    model_config = ConfigDict(extra="forbid")
    last: Annotated[int, Field(ge=1, le=1_000)]


class AuditTargets(BaseModel):
    """Layers as for jobs; tokens: all, the last n of each prompt, or chosen indices (negative from the end)."""

    model_config = ConfigDict(extra="forbid")
    layers: Literal["all"] | Annotated[list[int], Field(min_length=1, max_length=1_000)] | IndexRange = "all"
    tokens: Literal["all"] | LastTokens | Annotated[list[int], Field(min_length=1, max_length=1_000)] = Field(
        default_factory=lambda: LastTokens(last=1)
    )


class DetectorSpec(BaseModel):
    """A detector config (see selfie_core.detectors): kind, name, min_relevancy and the kind's own fields."""

    model_config = ConfigDict(extra="allow")
    kind: str
    name: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    min_relevancy: float = Field(0.0, ge=0.0, le=1.0)

    @field_validator("kind")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in KNOWN_DETECTOR_KINDS:
            raise ValueError(f"unknown detector kind {value!r}; known: {', '.join(KNOWN_DETECTOR_KINDS)}")
        return value

    def checked(self) -> dict[str, Any]:
        data = self.model_dump(exclude_none=True)
        need = _REQUIRED_FIELD[self.kind]
        value = data.get(need)
        if not value or not isinstance(value, (list, dict)):
            raise ValueError(f"a {self.kind} detector needs a non-empty '{need}'")
        if self.kind == "regex":
            for pattern in value:
                try:
                    re.compile(str(pattern))
                except re.error as exc:
                    raise ValueError(f"invalid regular expression {pattern!r}: {exc}") from None
        data.setdefault("name", self.kind)
        return data


class AuditOptions(BaseModel):
    """Engine options of the audit's jobs (as in POST /v1/jobs)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    template: Template | None = None
    k: Annotated[int, Field(ge=0, le=10_000)] = 1
    injection_mode: Literal["replace", "blend", "add"] = "replace"
    injection_strength: float = Field(1.0, ge=0.0, le=100.0)
    max_new_tokens: Annotated[int, Field(ge=1, le=100_000)] = 20
    decoding: Decoding = Field(default_factory=Decoding)
    priority: Annotated[int, Field(ge=0, le=9)] = 3

    @field_validator("template", mode="before")
    @classmethod
    def _preset_shorthand(cls, value: Any) -> Any:
        return {"preset": value} if isinstance(value, str) else value


def _check_detectors(value: list[DetectorSpec]) -> list[DetectorSpec]:
    names = [d.name or d.kind for d in value]
    if len(set(names)) != len(names):
        raise ValueError("detector names must be unique (name them)")
    for d in value:
        d.checked()
    return value


def validate_cron(expr: str) -> str:
    if not croniter.is_valid(expr):
        raise ValueError(f"invalid cron expression {expr!r} (five fields: minute hour day month weekday)")
    return expr


class AuditCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    name: Annotated[str, Field(min_length=1, max_length=200)]
    model: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    prompt_set: Annotated[str, Field(min_length=1, max_length=200)] = Field(
        description="Name of an uploaded prompt set or of a built-in one: " + ", ".join(BUILTIN)
    )
    targets: AuditTargets = Field(default_factory=AuditTargets)
    options: AuditOptions = Field(default_factory=AuditOptions)
    detectors: Annotated[list[DetectorSpec], Field(min_length=1, max_length=50)]
    schedule: Annotated[str, Field(max_length=120)] | None = Field(None, description="cron, UTC; null: manual only")
    enabled: bool = True

    _detectors = field_validator("detectors")(_check_detectors)

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        return validate_cron(value) if value else None


class AuditUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    targets: AuditTargets | None = None
    options: AuditOptions | None = None
    detectors: Annotated[list[DetectorSpec], Field(min_length=1, max_length=50)] | None = None
    schedule: Annotated[str, Field(max_length=120)] | None = None
    enabled: bool | None = None

    @field_validator("detectors")
    @classmethod
    def _dets(cls, value):
        return _check_detectors(value) if value is not None else value

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        return validate_cron(value) if value else value


# --- audits ---------------------------------------------------------------------------------------------------------


def next_fire(expr: str, after: datetime) -> datetime:
    return croniter(expr, as_utc(after)).get_next(datetime)


def resolve_prompt_set(session: Session, name_or_id: str | int) -> PromptSet:
    if isinstance(name_or_id, int) or str(name_or_id).isdigit():
        found = session.get(PromptSet, int(name_or_id))
        if found is not None:
            return found
    found = session.scalars(select(PromptSet).where(PromptSet.name == str(name_or_id))).first()
    if found is not None:
        return found
    if str(name_or_id) in BUILTIN:
        return ensure_builtin(session, str(name_or_id))
    raise AuditError(f"no prompt set {name_or_id!r}; upload one or use a built-in: {', '.join(BUILTIN)}", status=404)


def create_audit(session: Session, req: AuditCreate, settings: Settings, owner_key_id: int | None = None) -> Audit:
    """Store an audit (the caller commits)."""
    if session.scalar(select(Audit.id).where(Audit.name == req.name)) is not None:
        raise AuditError(f"an audit named {req.name!r} already exists", status=409)
    prompt_set = resolve_prompt_set(session, req.prompt_set)
    audit = Audit(
        name=req.name,
        model=req.model or settings.default_model,
        prompt_set_id=prompt_set.id,
        targets=req.targets.model_dump(mode="json"),
        options=req.options.model_dump(mode="json", exclude_none=True),
        detectors=[d.checked() for d in req.detectors],
        schedule=req.schedule,
        enabled=req.enabled,
        owner_key_id=owner_key_id,
        next_run_at=next_fire(req.schedule, utcnow()) if req.schedule and req.enabled else None,
    )
    session.add(audit)
    session.flush()
    return audit


def update_audit(session: Session, audit: Audit, req: AuditUpdate) -> Audit:
    fields = req.model_fields_set
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
    """A new pending run, or the audit's open one (runs of one audit never overlap). The caller commits."""
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
    due = session.execute(
        select(Audit.id, Audit.schedule, Audit.next_run_at).where(
            Audit.enabled.is_(True), Audit.schedule.is_not(None), Audit.next_run_at <= now
        )
    ).all()
    won = []
    for audit_id, schedule, fired_at in due:
        result = session.execute(
            update(Audit)
            .where(Audit.id == audit_id, Audit.next_run_at == fired_at)
            .values(next_run_at=next_fire(schedule, now))
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
    from selfie_jobs.submission import card_tokenizer, load_card

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
    from selfie_jobs.submission import SubmissionError, enqueue_chunks, idempotency_scope, prepare_job, store_job

    lease = lease_seconds or float(settings.lease_seconds)
    with session_factory() as session:
        if not claim_run(session, run_id, owner, lease):
            session.rollback()
            return session.get(AuditRun, run_id)
        session.commit()
        run = session.get(AuditRun, run_id)
        audit = session.get(Audit, run.audit_id)
        config = run.config
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
                    job, chunks = store_job(session, prepared, req, audit.owner_key_id if audit else None, settings,
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
            return _fail_run(session, run_id, f"a batch was refused: {exc.message}")
        run = session.get(AuditRun, run_id, populate_existing=True)
        if run.state == AuditRunState.SUBMITTING and run.owner == owner:
            run.state = AuditRunState.RUNNING
            run.owner = None
            run.lease_expires_at = None
            session.commit()
        return run


def _fail_run(session: Session, run_id: int, error: str) -> AuditRun:
    run = session.get(AuditRun, run_id, populate_existing=True)
    run.state = AuditRunState.FAILED
    run.error = error
    run.finished_at = utcnow()
    _cancel_open_jobs(session, run_id)
    session.commit()
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


# --- scanning -------------------------------------------------------------------------------------------------------


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
    return {
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
