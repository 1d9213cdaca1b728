"""/v1/jobs: submit (one route per job kind, from `selfie_jobs.kinds`), status, cancel, list, results of any kind
and interpretations (JSON or CSV)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request, Response, status

from api.bodies import StrictJSONRoute
from api.deps import PrincipalDep, SenderDep, SessionDep, SessionMakerDep, SettingsDep
from api.schemas import (
    CancelOut,
    ErrorOut,
    InterpretationList,
    InterpretationOut,
    JobAccepted,
    JobList,
    JobStatus,
    JobSummary,
    Links,
    Progress,
    PromptOut,
    ResultList,
    Timings,
)
from api.streaming import ClosingStreamingResponse
from selfie_jobs.chunks import as_utc
from selfie_jobs.errors import BadQuery, Conflict, DomainError, NotFound
from selfie_jobs.csv_cells import CSV_MODE_DOC, CsvMode
from selfie_jobs.ids import INT_MAX
from selfie_jobs.kinds import DEFAULT_KIND, all_kinds, get_kind
from selfie_jobs.models import Job
from selfie_jobs.queries import (
    SORT_NAMES,
    InterpretationFilter,
    cancel_job,
    interpretations_csv,
    interpretations_page,
    job_chunk_counts,
    job_view,
    list_jobs,
    visible_job,
)
from selfie_jobs.settings import Settings
from selfie_jobs.specs import EngineJobFields, JobCreate
from selfie_jobs.states import JobState
from selfie_jobs.submission import submit_job

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], route_class=StrictJSONRoute)

_JOB_ID = re.compile(r"[0-9a-f]{32}")
CSV_COLUMNS = ("prompt_index", "layer", "token", "source_token", "text", "mean_relevancy", "grounded",
               "ungrounded_reason", "relevancy", "token_ids", "worker", "model", "created_at")

_ERRORS = {
    400: {"model": ErrorOut, "description": "Malformed filter or cursor."},
    401: {"model": ErrorOut, "description": "Missing or invalid API key."},
    404: {"model": ErrorOut, "description": "No such job (or not yours)."},
    503: {"model": ErrorOut, "description": "Database unavailable; retry after the Retry-After seconds."},
}


def base_url(request: Request, settings: Settings) -> str:
    if "public_url" in settings.model_fields_set:
        return settings.public_url.rstrip("/")
    return str(request.base_url).rstrip("/")


def job_links(request: Request, settings: Settings, job_id: str, kind: str = DEFAULT_KIND) -> Links:
    return links_under(base_url(request, settings), job_id, kind)


def links_under(base: str, job_id: str, kind: str = DEFAULT_KIND) -> Links:
    root = f"{base}/v1/jobs/{job_id}"
    # Only an interpret job has interpretations; another kind's rows are at /results (its kind's columns).
    interpretations = root + "/interpretations" if kind == DEFAULT_KIND else None
    return Links(self=root, interpretations=interpretations, results=root + "/results",
                 cancel=root + "/cancel", page=f"{base}/ui/jobs/{job_id}")


def _visible_or_404(session, job_id: str, who) -> Job:
    job = visible_job(session, job_id, who) if _JOB_ID.fullmatch(job_id) else None
    if job is None:
        raise NotFound(f"no job {job_id!r}")
    return job


def _utc(value: datetime | None, name: str) -> datetime | None:
    if value is None:
        return None
    try:
        value = value if value.tzinfo else value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)
    except (OverflowError, ValueError):
        raise DomainError(f"{name} is out of range", field=name) from None


SUBMIT_RESPONSES = {
    200: {"model": JobAccepted, "description": "A job with this idempotency key exists already; it is returned."},
    404: {"model": ErrorOut, "description": "No such variant (or not yours): the request's `variant`."},
    409: {"model": ErrorOut, "description": "The idempotency key was used for a different request."},
    413: {"model": ErrorOut, "description": "More interpretations (or vectors) than a job may hold."},
    422: {"description": "Invalid request (shape, or against the model card)."},
    429: {"model": ErrorOut, "description": "Quota or rate limit; see Retry-After."},
    **{k: v for k, v in _ERRORS.items() if k in (401, 503)},
}


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=JobAccepted, responses=SUBMIT_RESPONSES,
             summary="Submit a job (interpret prompts' hidden states)")
def create_job(body: JobCreate, request: Request, response: Response, session: SessionDep, settings: SettingsDep,
               who: PrincipalDep, sender: SenderDep) -> JobAccepted:
    return submit(body, request, response, session, settings, who, sender)


def submit(body: EngineJobFields, request: Request, response: Response, session, settings: Settings, who,
           sender) -> JobAccepted:
    """Submit a request of any job kind and answer as the submit routes do (also for uploads)."""
    result = submit_job(session, body, settings, sender, owner_key_id=who.key_id, see_all=who.is_admin)
    job = result.job
    links = job_links(request, settings, job.id, job.kind)
    response.headers["Location"] = links.self
    if not result.created:
        response.status_code = status.HTTP_200_OK
    return JobAccepted(
        id=job.id,
        kind=job.kind,
        state=job.state,
        model=job.model,
        total=job.total,
        chunks=len(result.chunk_ids) if result.created else sum(job_chunk_counts(session, job.id).values()),
        enqueued=result.enqueued,
        created=result.created,
        link=links.self,
        links=links,
    )


@router.get("", response_model=JobList, responses=_ERRORS, summary="List jobs (newest first)")
def get_jobs(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    who: PrincipalDep,
    state: JobState | None = None,
    model: Annotated[str | None, Query(max_length=200, pattern=r"^[^\x00]*$")] = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
    owner: Annotated[int | None, Query(ge=0, le=INT_MAX, description="Admin keys only: jobs of one key.")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(max_length=1000)] = None,
) -> JobList:
    page = list_jobs(
        session, who, state=state.value if state else None, model=model,
        created_after=_utc(created_after, "created_after"), created_before=_utc(created_before, "created_before"),
        owner_key_id=owner, limit=limit, cursor=cursor,
    )
    return JobList(
        jobs=[
            JobSummary(id=j.id, kind=j.kind, model=j.model, state=j.state, priority=j.priority, done=j.done, total=j.total,
                       created_at=j.created_at, finished_at=j.finished_at, error=j.error,
                       link=job_links(request, settings, j.id).self)
            for j in page.jobs
        ],
        next_cursor=page.next_cursor,
    )


@router.get("/{job_id}", response_model=JobStatus, responses=_ERRORS, summary="Job status and progress")
def get_job(
    job_id: str,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    who: PrincipalDep,
    include_prompts: Annotated[bool, Query(description="False leaves `prompts` empty (cheap polling).")] = True,
) -> JobStatus:
    _visible_or_404(session, job_id, who)
    return job_status(session, job_id, who, base_url(request, settings), settings,
                      include_prompts=include_prompts)


def job_status(session, job_id: str, who, base: str, settings: Settings, *, include_prompts: bool) -> JobStatus:
    """The status of a visible job, as GET /v1/jobs/{id} answers it and its event stream sends it."""
    view = job_view(session, job_id, who, with_prompts=include_prompts, alive_seconds=settings.worker_alive_seconds)
    if view is None:
        raise NotFound(f"no job {job_id!r}")
    job = view.job
    links = links_under(base, job.id, job.kind)
    live = view.live
    return JobStatus(
        id=job.id,
        kind=job.kind,
        model=job.model,
        state=view.state,
        priority=job.priority,
        progress=Progress(done=live.done, total=live.total, fraction=round(live.fraction, 6),
                          in_flight=live.in_flight, decode_step=live.decode_step, decode_steps=live.decode_steps,
                          rows_per_second=live.rows_per_second, eta_seconds=live.eta_seconds),
        chunks=view.chunks,
        queue_position=view.queue_position,
        items_ahead=view.items_ahead,
        waiting=view.waiting,
        timings=Timings(created_at=job.created_at, started_at=view.started_at, finished_at=job.finished_at,
                        **view.timings()),
        error=job.error,
        spec=job.spec,
        ttl_seconds=job.ttl_seconds,
        baseline=job.baseline,
        prompts=[PromptOut.model_validate(p) for p in view.prompts],
        edit=get_kind(job.kind).progress(session, job),
        link=links.self,
        links=links,
    )


@router.post("/{job_id}/cancel", response_model=CancelOut, responses=_ERRORS, summary="Cancel a job")
def post_cancel(job_id: str, session: SessionDep, who: PrincipalDep) -> CancelOut:
    _visible_or_404(session, job_id, who)
    result = cancel_job(session, job_id, who)
    if result is None:
        raise NotFound(f"no job {job_id!r}")
    job, cancelled = result
    session.commit()
    return CancelOut(id=job.id, state=job.state, cancelled=cancelled)


def _csv_rows(maker, job_id: str, flt: InterpretationFilter, sort: str, cursor: str | None,
              limit: int | None, mode: CsvMode) -> Iterator[str | bytes]:
    with maker() as session:
        yield from interpretations_csv(session, job_id, flt, CSV_COLUMNS, mode, sort=sort, cursor=cursor, limit=limit)


@router.get(
    "/{job_id}/interpretations",
    response_model=InterpretationList,
    responses={**_ERRORS, 200: {"content": {"text/csv": {}}, "description": "JSON page, or CSV (all matching rows "
                                "unless `limit` is given) with `format=csv` or `Accept: text/csv`."},
               409: {"model": ErrorOut, "description": "A job of another kind (its rows are at /results)."}},
    summary="Interpretations of a job: filter, sort, paginate; JSON or CSV",
)
def get_interpretations(
    job_id: str,
    session: SessionDep,
    maker: SessionMakerDep,
    who: PrincipalDep,
    prompt: Annotated[int | None, Query(ge=0, le=INT_MAX, description="Prompt index.")] = None,
    layer_min: Annotated[int | None, Query(ge=0, le=INT_MAX)] = None,
    layer_max: Annotated[int | None, Query(ge=0, le=INT_MAX)] = None,
    token: Annotated[int | None, Query(ge=0, le=INT_MAX, description="Token index in the prompt.")] = None,
    source_token: Annotated[str | None, Query(max_length=200, pattern=r"^[^\x00]*$")] = None,
    min_relevancy: Annotated[float | None, Query(allow_inf_nan=False, ge=-1e9, le=1e9)] = None,
    grounded: Annotated[bool | None, Query(description="Only grounded (true) or ungrounded (false) rows.")] = None,
    q: Annotated[str | None, Query(max_length=200, pattern=r"^[^\x00]*$", description="Text contains (any case).")] = None,
    sort: Annotated[Literal[SORT_NAMES], Query()] = "position",  # type: ignore[valid-type]
    limit: Annotated[int | None, Query(ge=1, le=1000, description="JSON default 100; CSV default all.")] = None,
    cursor: Annotated[str | None, Query(max_length=1000)] = None,
    format: Annotated[Literal["json", "csv"] | None, Query()] = None,  # noqa: A002 - the query parameter's name
    csv_mode: Annotated[CsvMode, Query(alias="csv", description=CSV_MODE_DOC)] = "safe",
    accept: Annotated[str | None, Header(include_in_schema=False)] = None,
):
    job = _visible_or_404(session, job_id, who)
    if job.kind != DEFAULT_KIND:  # an empty page would read as "no results yet" for ever
        raise Conflict(f"job {job.id} is a {job.kind} job: it has no interpretations; its rows are at "
                       f"GET /v1/jobs/{job.id}/results (Client.rows)", field="job_id")
    flt = InterpretationFilter(prompt=prompt, layer_min=layer_min, layer_max=layer_max, token=token,
                               source_token=source_token, min_relevancy=min_relevancy, q=q, grounded=grounded)
    as_csv = format == "csv" or (format is None and accept is not None and "text/csv" in accept)
    if as_csv:
        # Validate the cursor now: once streaming starts the status is sent.
        interpretations_page(session, job.id, flt, sort=sort, limit=1, cursor=cursor)
        return ClosingStreamingResponse(
            _csv_rows(maker, job.id, flt, sort, cursor, limit, csv_mode),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="selfie-{job.id}.csv"'},
        )
    page = interpretations_page(session, job.id, flt, sort=sort, limit=limit or 100, cursor=cursor)
    return InterpretationList(
        job_id=job.id,
        state=job.state,
        items=[InterpretationOut.model_validate(r) for r in page.rows],
        next_cursor=page.next_cursor,
    )


def _kind_submit_route(kind_name: str, request_schema: type[EngineJobFields]) -> None:
    """`POST /v1/jobs/<kind>`: submit a job of that kind, with its own request schema (interpret keeps /v1/jobs)."""

    def create(body, request: Request, response: Response, session: SessionDep, settings: SettingsDep,
               who: PrincipalDep, sender: SenderDep) -> JobAccepted:
        return submit(body, request, response, session, settings, who, sender)

    # The body's type is the kind's schema, known only here: FastAPI reads it from the annotation.
    create.__annotations__["body"] = request_schema
    create.__name__ = f"create_{kind_name}_job"
    router.post(f"/{kind_name}", status_code=status.HTTP_202_ACCEPTED, response_model=JobAccepted,
                responses=SUBMIT_RESPONSES, summary=f"Submit a {kind_name} job")(create)


for _name, _kind in all_kinds().items():
    if _name != DEFAULT_KIND:
        _kind_submit_route(_name, _kind.request)


def _csv_result_rows(maker, job_id: str, kind_name: str, limit: int | None, mode: CsvMode) -> Iterator[str | bytes]:
    kind = get_kind(kind_name)
    with maker() as session:
        yield from kind.export_csv(session, job_id, limit=limit, mode=mode)


@router.get(
    "/{job_id}/results",
    response_model=ResultList,
    responses={**_ERRORS, 200: {"content": {"text/csv": {}}, "description": "JSON page of the job kind's rows, or "
                                "CSV (all rows unless `limit` is given) with `format=csv` or `Accept: text/csv`."}},
    summary="Results of a job of any kind, in the kind's row shape; JSON or CSV",
)
def get_results(
    job_id: str,
    session: SessionDep,
    maker: SessionMakerDep,
    who: PrincipalDep,
    limit: Annotated[int | None, Query(ge=1, le=1000, description="JSON default 100; CSV default all.")] = None,
    cursor: Annotated[str | None, Query(max_length=1000)] = None,
    format: Annotated[Literal["json", "csv"] | None, Query()] = None,  # noqa: A002 - the query parameter's name
    csv_mode: Annotated[CsvMode, Query(alias="csv", description=CSV_MODE_DOC)] = "safe",
    accept: Annotated[str | None, Header(include_in_schema=False)] = None,
):
    job = _visible_or_404(session, job_id, who)
    kind = get_kind(job.kind)
    as_csv = format == "csv" or (format is None and accept is not None and "text/csv" in accept)
    if as_csv:
        if cursor:
            raise BadQuery("CSV exports start at the first row (no cursor)", field="cursor")
        return ClosingStreamingResponse(
            _csv_result_rows(maker, job.id, job.kind, limit, csv_mode), media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="selfie-{job.id}.csv"'},
        )
    page = kind.read_page(session, job.id, limit=limit or 100, cursor=cursor)
    variant = (page.extra or {}).get("variant")
    return ResultList(job_id=job.id, kind=job.kind, state=job.state, columns=list(kind.csv_columns),
                      items=[_utc_times(row) for row in page.rows], next_cursor=page.next_cursor,
                      variant=None if variant is None else _utc_times(variant))


def _utc_times(row: dict[str, Any]) -> dict[str, Any]:
    """A row's times as UTC, whatever the database hands back (SQLite's are naive): JSON gives them a 'Z', as every
    other time the API answers, so a browser never reads them as local times."""
    return {k: as_utc(v) if isinstance(v, datetime) else v for k, v in row.items()}
