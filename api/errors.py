"""Domain errors and database failures mapped to HTTP, once, for every route: `install(app)` registers the handlers.

Routes raise (or let through) `selfie_jobs.errors.DomainError`; they never catch one to build a response.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from api.bodies import json_safe
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


async def database_busy(_request: Request, exc: PoolTimeoutError) -> JSONResponse:
    """No pool connection (or, on SQLite, no write turn: selfie_jobs.db.DatabaseBusy) in time: an overload,
    answered like an outage, never 500."""
    log.warning("database busy: %s", exc)
    return JSONResponse(
        status_code=503,
        content={"detail": "the database is busy; retry later"},
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


async def value_out_of_range(_request: Request, exc: DataError) -> JSONResponse:
    log.info("value rejected by the database: %s", exc.orig)
    return JSONResponse(status_code=400, content={"detail": "a value is out of the range the database accepts"})


async def invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
    # FastAPI's own 422, with the echoed input made encodable: a NaN or a lone surrogate in it made the answer a 500
    return JSONResponse(status_code=422, content={"detail": json_safe(jsonable_encoder(exc.errors()))})


def install(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, invalid_request)  # type: ignore[arg-type]
    app.add_exception_handler(DomainError, domain_error)  # type: ignore[arg-type]
    app.add_exception_handler(OperationalError, database_unavailable)  # type: ignore[arg-type]
    app.add_exception_handler(PoolTimeoutError, database_busy)  # type: ignore[arg-type]
    app.add_exception_handler(DataError, value_out_of_range)  # type: ignore[arg-type]
