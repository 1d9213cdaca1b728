"""Domain errors and database failures mapped to HTTP, once, for every route: `install(app)` registers the handlers.

Routes raise (or let through) `selfie_jobs.errors.DomainError`; they never catch one to build a response.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, OperationalError

from selfie_jobs.errors import DomainError

log = logging.getLogger(__name__)

#: Seconds a client is told to wait when the database is unavailable.
RETRY_AFTER_SECONDS = 5


async def domain_error(_request: Request, exc: DomainError) -> JSONResponse:
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
    return JSONResponse(status_code=exc.status, content={"detail": exc.message, "field": exc.field}, headers=headers)


async def database_unavailable(_request: Request, exc: OperationalError) -> JSONResponse:
    log.warning("database unavailable: %s", exc.orig)
    return JSONResponse(
        status_code=503,
        content={"detail": "the database is unavailable; retry later"},
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


async def value_out_of_range(_request: Request, exc: DataError) -> JSONResponse:
    log.info("value rejected by the database: %s", exc.orig)
    return JSONResponse(status_code=400, content={"detail": "a value is out of the range the database accepts"})


def install(app: FastAPI) -> None:
    app.add_exception_handler(DomainError, domain_error)  # type: ignore[arg-type]
    app.add_exception_handler(OperationalError, database_unavailable)  # type: ignore[arg-type]
    app.add_exception_handler(DataError, value_out_of_range)  # type: ignore[arg-type]
