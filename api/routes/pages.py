"""The results explorer: static pages served by the API that read the same JSON API the clients use.

No front-end build: plain HTML, CSS and JavaScript under api/static/, charts drawn as inline SVG (nothing is
fetched from outside the service).
"""

from __future__ import annotations

from pathlib import Path as FsPath

from typing import Annotated

from fastapi import APIRouter, FastAPI, Path
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC = FsPath(__file__).resolve().parent.parent / "static"
router = APIRouter(include_in_schema=False)
# The pages hold no data (it comes from the API, with the caller's key), so they may be cached briefly.
_HEADERS = {"Cache-Control": "no-cache"}


@router.get("/ui")
def index() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers=_HEADERS)


@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/ui")


@router.get("/ui/jobs/{job_id}")
def job_page(job_id: str) -> FileResponse:  # noqa: ARG001 - the page reads the id from its URL
    return FileResponse(STATIC / "job.html", headers=_HEADERS)


@router.get("/ui/audits/{audit_id}")
def audit_page(audit_id: Annotated[int, Path(ge=1, le=2**31 - 1)]) -> FileResponse:  # noqa: ARG001
    return FileResponse(STATIC / "audit.html", headers=_HEADERS)


@router.get("/ui/variants/{variant_id}")
def variant_page(variant_id: str) -> FileResponse:  # noqa: ARG001 - the page reads the id from its URL
    return FileResponse(STATIC / "variant.html", headers=_HEADERS)


def mount(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/ui/static", StaticFiles(directory=STATIC), name="ui-static")
