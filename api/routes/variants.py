"""/v1/variants: the model variants edit jobs made (a decoder block's edited MLP, served by the workers to the jobs
that name it). A key lists, reads and deletes its own; another key's variant answers 404, as one that does not
exist. Deleting removes the variant's files and its row: a later job naming it is refused at submission, one
queued before fails in the worker with that reason (`selfie_jobs.variants`)."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Query, Request

from api.bodies import StrictJSONRoute
from api.deps import PrincipalDep, SessionDep, SettingsDep
from api.routes.jobs import base_url
from api.schemas import ErrorOut, VariantDeleted, VariantList, VariantOut, VariantSummary
from selfie_jobs.errors import NotFound
from selfie_jobs.models import Variant
from selfie_jobs.variants import delete_variant, get_visible, list_variants, store_root

router = APIRouter(prefix="/v1/variants", tags=["variants"], route_class=StrictJSONRoute)

_VARIANT_ID = re.compile(r"[0-9a-f]{32}")
_ERRORS = {
    400: {"model": ErrorOut, "description": "Malformed cursor."},
    401: {"model": ErrorOut, "description": "Missing or invalid API key."},
    404: {"model": ErrorOut, "description": "No such variant (or not yours)."},
    503: {"model": ErrorOut, "description": "Database unavailable; retry after the Retry-After seconds."},
}


def _visible_or_404(session, variant_id: str, who) -> Variant:
    variant = get_visible(session, variant_id, who.key_id, who.is_admin) if _VARIANT_ID.fullmatch(variant_id) else None
    if variant is None:
        raise NotFound(f"no such variant {variant_id!r}")
    return variant


def _summary(variant: Variant, base: str) -> dict:
    return {"id": variant.id, "job_id": variant.job_id, "model": variant.model, "method": variant.method,
            "layer": variant.layer, "created_at": variant.created_at, "link": f"{base}/v1/variants/{variant.id}",
            "page": f"{base}/ui/variants/{variant.id}"}


@router.get("", response_model=VariantList, responses=_ERRORS, summary="List model variants (newest first)")
def get_variants(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    who: PrincipalDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(max_length=1000)] = None,
) -> VariantList:
    rows, next_cursor = list_variants(session, who.key_id, who.is_admin, limit=limit, cursor=cursor)
    base = base_url(request, settings)
    return VariantList(variants=[VariantSummary(**_summary(v, base)) for v in rows], next_cursor=next_cursor)


@router.get("/{variant_id}", response_model=VariantOut, responses=_ERRORS, summary="A model variant")
def get_variant(variant_id: str, request: Request, session: SessionDep, settings: SettingsDep,
                who: PrincipalDep) -> VariantOut:
    variant = _visible_or_404(session, variant_id, who)
    base = base_url(request, settings)
    return VariantOut(**_summary(variant, base), sha256=variant.sha256, settings=variant.settings or {},
                      losses=variant.losses or [], evaluations=variant.evaluations or {},
                      job_link=f"{base}/v1/jobs/{variant.job_id}")


@router.delete("/{variant_id}", response_model=VariantDeleted, responses=_ERRORS,
               summary="Delete a model variant and its files")
def remove_variant(variant_id: str, session: SessionDep, settings: SettingsDep, who: PrincipalDep) -> VariantDeleted:
    variant = _visible_or_404(session, variant_id, who)
    if not delete_variant(session, variant, store_root(settings)):
        # a concurrent delete removed it first: that one answered deleted, and removed the files
        raise NotFound(f"no such variant {variant_id!r}")
    return VariantDeleted(id=variant_id, deleted=True)
