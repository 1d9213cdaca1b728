"""/v1/prompt-sets, /v1/audits and /v1/audit-runs: upload prompt sets, define audits, start runs, read reports."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Path, Query, Request, UploadFile, status
from pydantic import BaseModel
from sqlalchemy import and_, select
from sqlalchemy.exc import IntegrityError

from api.bodies import StrictJSONRoute
from api.deps import PrincipalDep, SenderDep, SessionDep, SessionMakerDep, SettingsDep
from api.streaming import ClosingStreamingResponse
from selfie_jobs import audits as A
from selfie_jobs.audit_models import Audit, AuditFinding, AuditRun, AuditRunJob, PromptSet, PromptSetItem
from selfie_jobs.audit_reports import finding_dict, iter_findings_csv, run_report, top_findings
from selfie_jobs.auth import Principal
from selfie_jobs.errors import NotFound
from selfie_jobs.csv_cells import CSV_MODE_DOC, CsvMode
from selfie_jobs.ids import BIG_MAX, INT_MAX
from selfie_jobs.models import Prompt
from selfie_jobs.queries import visible_job
from selfie_jobs.prompt_sets import BUILTIN, check_name_free, create_prompt_set, detect_format
from selfie_jobs.queue import CONTROL_QUEUE, RUN_AUDIT_TASK

log = logging.getLogger(__name__)

router = APIRouter(tags=["audits"], route_class=StrictJSONRoute)
AuditId = Annotated[int, Path(ge=1, le=INT_MAX)]
RunId = Annotated[int, Path(ge=1, le=INT_MAX)]
PromptSetId = Annotated[int, Path(ge=1, le=INT_MAX)]


class PromptSetOut(BaseModel):
    id: int
    name: str
    description: str
    source: str
    size: int
    created_at: datetime
    owner_key_id: int | None = None  # the key that uploaded it (callers other than admins only see their own)


class PromptSetList(BaseModel):
    prompt_sets: list[PromptSetOut]
    builtin: dict[str, dict[str, str]]


class AuditOut(BaseModel):
    id: int
    name: str
    model: str
    prompt_set_id: int
    prompt_set: str | None = None
    targets: dict[str, Any]
    options: dict[str, Any]
    detectors: list[dict[str, Any]]
    schedule: str | None
    enabled: bool
    next_run_at: datetime | None
    created_at: datetime
    owner_key_id: int | None = None  # as for prompt sets
    last_run: dict[str, Any] | None = None
    link: str


class RunOut(BaseModel):
    id: int
    audit_id: int
    state: str
    trigger: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None
    progress: dict[str, Any]
    link: str
    links: dict[str, str]


# --- helpers --------------------------------------------------------------------------------------------------------


def _root(request: Request) -> str:
    settings = request.app.state.settings
    if "public_url" in settings.model_fields_set:
        return settings.public_url.rstrip("/")
    return str(request.base_url).rstrip("/")


def _visible(who: Principal, owner_key_id: int | None) -> bool:
    return who.can_see(owner_key_id)


def _audit_or_404(session, audit_id: int, who: Principal) -> Audit:
    audit = session.get(Audit, audit_id)
    if audit is None or not _visible(who, audit.owner_key_id):
        raise NotFound(f"no audit {audit_id}")
    return audit


def _run_or_404(session, run_id: int, who: Principal) -> AuditRun:
    run = session.get(AuditRun, run_id)
    if run is None:
        raise NotFound(f"no audit run {run_id}")
    _audit_or_404(session, run.audit_id, who)
    return run


def _run_out(request: Request, session, run: AuditRun) -> RunOut:
    root = f"{_root(request)}/v1/audit-runs/{run.id}"
    return RunOut(
        id=run.id, audit_id=run.audit_id, state=run.state, trigger=run.trigger, created_at=run.created_at,
        started_at=run.started_at, finished_at=run.finished_at, error=run.error,
        progress=A.run_progress(session, run), link=root,
        links={"self": root, "report": root + "/report", "findings": root + "/findings",
               "csv": root + "/findings?format=csv", "jobs": root + "/jobs", "cancel": root + "/cancel",
               "page": f"{_root(request)}/ui/audits/{run.audit_id}?run={run.id}"},
    )


def _audit_out(request: Request, session, audit: Audit) -> AuditOut:
    last = session.scalars(select(AuditRun).where(AuditRun.audit_id == audit.id).order_by(AuditRun.id.desc())).first()
    prompt_set = session.get(PromptSet, audit.prompt_set_id)
    return AuditOut(
        id=audit.id, name=audit.name, model=audit.model, prompt_set_id=audit.prompt_set_id,
        prompt_set=prompt_set.name if prompt_set else None, targets=audit.targets, options=audit.options,
        detectors=audit.detectors, schedule=audit.schedule, enabled=audit.enabled, next_run_at=audit.next_run_at,
        created_at=audit.created_at, owner_key_id=audit.owner_key_id,
        last_run={"id": last.id, "state": last.state, "flags": last.flags, "created_at": last.created_at.isoformat()}
        if last else None,
        link=f"{_root(request)}/v1/audits/{audit.id}",
    )


def _name_race(check: Callable[[], None]) -> None:
    """After an insert hit a unique name: if a concurrent request took the name between our check and our insert,
    the check raises the 409 it gives; any other conflict stays an error."""
    check()


# --- prompt sets ----------------------------------------------------------------------------------------------------


@router.get("/v1/prompt-sets", response_model=PromptSetList, summary="Prompt sets (uploaded and built-in)")
def list_prompt_sets(session: SessionDep, who: PrincipalDep) -> PromptSetList:
    rows = session.scalars(select(PromptSet).order_by(PromptSet.id)).all()
    return PromptSetList(
        prompt_sets=[PromptSetOut.model_validate(p, from_attributes=True) for p in rows
                     if p.source == "builtin" or _visible(who, p.owner_key_id)],
        builtin=BUILTIN,
    )


@router.post("/v1/prompt-sets", response_model=PromptSetOut, status_code=status.HTTP_201_CREATED,
             summary="Upload a prompt set (JSONL or CSV, streamed)")
def upload_prompt_set(
    session: SessionDep,
    settings: SettingsDep,
    who: PrincipalDep,
    file: Annotated[UploadFile, File(description="JSONL (one prompt or {'prompt': ...} per line) or CSV with a "
                                                 "'prompt' column; other fields are kept as metadata.")],
    name: Annotated[str, Form(min_length=1, max_length=200)],
    description: Annotated[str, Form(max_length=2000)] = "",
    format: Annotated[Literal["jsonl", "csv"] | None, Form()] = None,  # noqa: A002 - the form field's name
) -> PromptSetOut:
    try:
        fmt = format or detect_format(file.filename, file.content_type)
        # The upload is spooled to a temporary file by the multipart parser; it is read row by row here.
        prompt_set = create_prompt_set(
            session, name, file.file, fmt, description=description, owner_key_id=who.key_id,
            max_chars=settings.max_prompt_chars, max_items=1_000_000,
        )
        session.commit()
    except IntegrityError:
        session.rollback()
        _name_race(lambda: check_name_free(session, name, who.key_id))
        raise
    return PromptSetOut.model_validate(prompt_set, from_attributes=True)


@router.get("/v1/prompt-sets/{prompt_set_id}/items", summary="Items of a prompt set (keyset pages)")
def prompt_set_items(
    prompt_set_id: PromptSetId,
    session: SessionDep,
    who: PrincipalDep,
    after: Annotated[int, Query(ge=-1, le=INT_MAX)] = -1,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    ps = session.get(PromptSet, prompt_set_id)
    if ps is None or not (ps.source == "builtin" or _visible(who, ps.owner_key_id)):
        raise NotFound(f"no prompt set {prompt_set_id}")
    rows = session.scalars(
        select(PromptSetItem).where(PromptSetItem.prompt_set_id == ps.id, PromptSetItem.index > after)
        .order_by(PromptSetItem.index).limit(limit)
    ).all()
    return {
        "prompt_set_id": ps.id,
        "items": [{"index": r.index, "text": r.text, "meta": r.meta} for r in rows],
        "next_after": rows[-1].index if len(rows) == limit else None,
    }


# --- audits ---------------------------------------------------------------------------------------------------------


@router.post("/v1/audits", response_model=AuditOut, status_code=status.HTTP_201_CREATED, summary="Define an audit")
def create_audit(body: A.AuditCreate, request: Request, session: SessionDep, settings: SettingsDep,
                 who: PrincipalDep) -> AuditOut:
    def store() -> AuditOut:
        audit = A.create_audit(session, body, settings, who)
        session.commit()
        return _audit_out(request, session, audit)

    try:
        return store()
    except IntegrityError:
        session.rollback()
        _name_race(lambda: A.check_audit_name(session, body.name, who.key_id))
    # The name is free, so a concurrent request stored the built-in prompt set this audit uses (built-ins are stored
    # on first use) between our look-up and our insert: it is there now.
    return store()


@router.get("/v1/audits", summary="Audits")
def list_audits(request: Request, session: SessionDep, who: PrincipalDep) -> dict[str, list[AuditOut]]:
    rows = session.scalars(select(Audit).order_by(Audit.id)).all()
    return {"audits": [_audit_out(request, session, a) for a in rows if _visible(who, a.owner_key_id)]}


@router.get("/v1/audits/{audit_id}", response_model=AuditOut, summary="One audit")
def get_audit(audit_id: AuditId, request: Request, session: SessionDep, who: PrincipalDep) -> AuditOut:
    return _audit_out(request, session, _audit_or_404(session, audit_id, who))


@router.patch("/v1/audits/{audit_id}", response_model=AuditOut, summary="Change an audit (schedule, detectors, ...)")
def patch_audit(audit_id: AuditId, body: A.AuditUpdate, request: Request, session: SessionDep,
                settings: SettingsDep, who: PrincipalDep) -> AuditOut:
    audit = _audit_or_404(session, audit_id, who)
    A.update_audit(session, audit, body, settings)  # checks before it changes anything
    session.commit()
    return _audit_out(request, session, audit)


@router.post("/v1/audits/{audit_id}/runs", response_model=RunOut, status_code=status.HTTP_202_ACCEPTED,
             summary="Start a run (or return the audit's open one)")
def start_run(audit_id: AuditId, request: Request, session: SessionDep, who: PrincipalDep, sender: SenderDep) -> RunOut:
    audit = _audit_or_404(session, audit_id, who)
    run, created = A.start_run(session, audit, "manual")
    session.commit()
    if created:
        # The fan-out runs on a worker (control queue); if this message is lost, the beat tick resumes the run.
        try:
            sender.send_task(RUN_AUDIT_TASK, args=[audit.id], kwargs={"run_id": run.id}, queue=CONTROL_QUEUE)
        except Exception:  # noqa: BLE001 - any broker failure: the run is stored, the audit tick picks it up
            log.warning("could not enqueue audit run %s; the next audit tick will start it", run.id, exc_info=True)
    return _run_out(request, session, run)


@router.get("/v1/audits/{audit_id}/runs", summary="Runs of an audit (newest first)")
def list_runs(audit_id: AuditId, request: Request, session: SessionDep, who: PrincipalDep,
              limit: Annotated[int, Query(ge=1, le=500)] = 50) -> dict[str, Any]:
    _audit_or_404(session, audit_id, who)
    runs = session.scalars(
        select(AuditRun).where(AuditRun.audit_id == audit_id).order_by(AuditRun.id.desc()).limit(limit)
    ).all()
    return {"audit_id": audit_id, "runs": [_run_out(request, session, r) for r in runs]}


# --- runs -----------------------------------------------------------------------------------------------------------


@router.get("/v1/audit-runs/{run_id}", response_model=RunOut, summary="Run status and progress")
def get_run(run_id: RunId, request: Request, session: SessionDep, who: PrincipalDep) -> RunOut:
    return _run_out(request, session, _run_or_404(session, run_id, who))


@router.post("/v1/audit-runs/{run_id}/cancel", response_model=RunOut, summary="Cancel a run and its open jobs")
def cancel_run(run_id: RunId, request: Request, session: SessionDep, who: PrincipalDep) -> RunOut:
    run = _run_or_404(session, run_id, who)
    A.cancel_run(session, run)
    session.commit()
    return _run_out(request, session, run)


@router.get("/v1/audit-runs/{run_id}/report", summary="Flags per layer and token, top findings, diff vs previous run")
def get_report(run_id: RunId, session: SessionDep, who: PrincipalDep,
               top: Annotated[int, Query(ge=1, le=500)] = 20) -> dict[str, Any]:
    run = _run_or_404(session, run_id, who)
    report = run_report(session, run, top=top)
    report["progress"] = A.run_progress(session, run)
    return report


@router.get("/v1/audit-runs/{run_id}/jobs", summary="The jobs a run fanned out into")
def get_run_jobs(run_id: RunId, request: Request, session: SessionDep, who: PrincipalDep) -> dict[str, Any]:
    _run_or_404(session, run_id, who)
    rows = session.scalars(select(AuditRunJob).where(AuditRunJob.run_id == run_id).order_by(AuditRunJob.batch)).all()
    root = _root(request)
    return {"run_id": run_id, "jobs": [
        {"batch": r.batch, "job_id": r.job_id, "prompt_offset": r.prompt_offset, "prompt_count": r.prompt_count,
         "scanned": r.scanned, "flags": r.flags, "link": f"{root}/v1/jobs/{r.job_id}", "page": f"{root}/ui/jobs/{r.job_id}"}
        for r in rows
    ]}


@router.get("/v1/audit-runs/{run_id}/findings", summary="Findings of a run: JSON pages or the whole CSV")
def get_findings(
    run_id: RunId,
    session: SessionDep,
    maker: SessionMakerDep,
    who: PrincipalDep,
    format: Literal["json", "csv"] = "json",  # noqa: A002 - the query parameter's name
    detector: Annotated[str | None, Query(max_length=200)] = None,
    layer: Annotated[int | None, Query(ge=0, le=INT_MAX)] = None,
    after: Annotated[int, Query(ge=0, le=BIG_MAX, description="Keyset cursor: the last id of the previous page.")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    sort: Literal["id", "relevancy"] = "id",
    csv_mode: Annotated[CsvMode, Query(alias="csv", description=CSV_MODE_DOC)] = "safe",
):
    run = _run_or_404(session, run_id, who)
    if format == "csv":
        def rows():
            with maker() as s:
                yield from iter_findings_csv(s, run.id, mode=csv_mode)

        return ClosingStreamingResponse(
            rows(), media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="audit-run-{run.id}.csv"'})
    if sort == "relevancy":
        return {"run_id": run.id, "items": top_findings(session, run.id, limit, detector=detector, layer=layer),
                "next_after": None}
    q = (
        select(AuditFinding, Prompt.text, Prompt.tokens)
        .join(Prompt, and_(Prompt.job_id == AuditFinding.job_id, Prompt.index == AuditFinding.prompt_index))
        .where(AuditFinding.run_id == run.id, AuditFinding.id > after)
        .order_by(AuditFinding.id).limit(limit)
    )
    if detector is not None:
        q = q.where(AuditFinding.detector == detector)
    if layer is not None:
        q = q.where(AuditFinding.layer == layer)
    rows = session.execute(q).all()
    return {"run_id": run.id, "items": [finding_dict(f, t, toks) for f, t, toks in rows],
            "next_after": rows[-1][0].id if len(rows) == limit else None}


@router.get("/v1/jobs/{job_id}/findings", summary="Audit findings on one job's interpretations (for the grid)")
def get_job_findings(
    job_id: Annotated[str, Path(min_length=32, max_length=32, pattern="^[0-9a-f]{32}$")],
    session: SessionDep,
    who: PrincipalDep,
    prompt: Annotated[int | None, Query(ge=0, le=INT_MAX, description="Prompt index in the job.")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 5_000,
) -> dict[str, Any]:
    if visible_job(session, job_id, who) is None:
        raise NotFound(f"no job {job_id!r}")
    q = select(AuditFinding).where(AuditFinding.job_id == job_id).order_by(AuditFinding.id).limit(limit)
    if prompt is not None:
        q = q.where(AuditFinding.prompt_index == prompt)
    rows = session.scalars(q).all()
    return {"job_id": job_id, "run_id": rows[0].run_id if rows else None,
            "items": [{"prompt_index": f.prompt_index, "layer": f.layer, "token": f.token, "detector": f.detector,
                       "label": f.label, "match": f.match, "mean_relevancy": f.mean_relevancy} for f in rows]}
