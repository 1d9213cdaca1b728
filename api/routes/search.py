"""/v1/search: words and phrases across every result text the key may read (interpretations, vector
interpretations), on the database's full-text index (`selfie_jobs.search`)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel

from api.bodies import StrictJSONRoute
from api.deps import PrincipalDep, SessionDep
from api.routes.jobs import _ERRORS, _utc
from selfie_jobs.errors import DomainError
from selfie_jobs.ids import INT_MAX
from selfie_jobs.search import MAX_QUERY_CHARS, SOURCES, SearchFilter, search

router = APIRouter(tags=["search"], route_class=StrictJSONRoute)


class SearchHit(BaseModel):
    kind: str
    id: int
    job_id: str
    model: str
    created_at: datetime
    text: str
    mean_relevancy: float
    audit_run: int | None = None
    prompt_index: int | None = None
    layer: int | None = None
    token: int | None = None
    source_token: str | None = None
    vector_index: int | None = None
    label: str | None = None
    grounded: bool | None = None  # an interpretation's judgement (null: a vector's, or stored before judging)


class SearchResults(BaseModel):
    items: list[SearchHit]
    next_cursor: str | None = None


_NO_NUL = r"^[^\x00]*$"


# /v1/interpretations?q=... is the same search under the name of what it finds (GET /v1/jobs/{id}/interpretations
# reads one job's; this one reads them across the jobs the key may see)
@router.get("/v1/interpretations", response_model=SearchResults, responses=_ERRORS,
            summary="Search interpretations and vector interpretations by words (the same as /v1/search)")
@router.get("/v1/search", response_model=SearchResults, responses=_ERRORS,
            summary="Search result texts by words and \"quoted phrases\" (newest first)")
def search_results(
    session: SessionDep,
    who: PrincipalDep,
    q: Annotated[str, Query(min_length=1, max_length=MAX_QUERY_CHARS, pattern=_NO_NUL,
                            description="Words (all must occur) and \"quoted phrases\"; case-insensitive; "
                                        "anything but letters and digits separates words.")],
    model: Annotated[str | None, Query(max_length=200, pattern=_NO_NUL)] = None,
    job: Annotated[str | None, Query(pattern=r"^[0-9a-f]{32}$")] = None,
    audit_run: Annotated[int | None, Query(ge=0, le=INT_MAX)] = None,
    kind: Annotated[Literal["interpret", "vectors"] | None, Query(description="Only this kind's results.")] = None,
    layer_min: Annotated[int | None, Query(ge=0, le=INT_MAX)] = None,
    layer_max: Annotated[int | None, Query(ge=0, le=INT_MAX)] = None,
    since: datetime | None = None,
    until: datetime | None = None,
    grounded: Annotated[bool | None, Query(description="Only interpretations judged grounded (true) or not (false); "
                                                        "leaves out vector interpretations and rows never judged.")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(max_length=1000)] = None,
) -> dict[str, Any]:
    if layer_min is not None and layer_max is not None and layer_min > layer_max:
        raise DomainError(f"layer_min={layer_min} is above layer_max={layer_max}", field="layer_min", status=400)
    flt = SearchFilter(model=model, job_id=job, audit_run=audit_run, kinds=(kind,) if kind else tuple(SOURCES),
                       layer_min=layer_min, layer_max=layer_max, since=_utc(since, "since"),
                       until=_utc(until, "until"), grounded=grounded)
    page = search(session, who, q, flt, limit=limit, cursor=cursor)
    return {"items": page.rows, "next_cursor": page.next_cursor}
