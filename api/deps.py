"""Request dependencies: settings, one typed database session, the asking principal, the task sender."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker

from api.gate import PRINCIPAL_STATE_KEY, lookup_principal
from selfie_jobs.auth import LOCAL_PRINCIPAL, Principal
from selfie_jobs.queue import TaskSender
from selfie_jobs.settings import Settings


def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


def get_sessionmaker_dep(request: Request) -> sessionmaker[Session]:
    return request.app.state.sessionmaker


def get_db(request: Request) -> Iterator[Session]:
    with request.app.state.sessionmaker() as session:
        yield session


def get_sender(request: Request) -> TaskSender:
    return request.app.state.task_sender


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
SessionDep = Annotated[Session, Depends(get_db)]
SessionMakerDep = Annotated[sessionmaker[Session], Depends(get_sessionmaker_dep)]
SenderDep = Annotated[TaskSender, Depends(get_sender)]

_bearer = HTTPBearer(auto_error=False, description="An API key made with `selfie keys create`.")


def get_principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The key asking, as `api.gate.Authentication` found it before the body was read (it answered 401 for a
    missing or dead key), then counted against the key's rate limit. Holds no database session: a request's
    session is opened only where the route uses it."""
    settings: Settings = request.app.state.settings
    if not settings.auth_enabled:
        return LOCAL_PRINCIPAL
    principal = getattr(request.state, PRINCIPAL_STATE_KEY, None)
    if principal is None:  # an app without the middleware: look the key up here, the same way
        token = credentials.credentials if credentials is not None and credentials.scheme.lower() == "bearer" else None
        principal = lookup_principal(request.app.state.sessionmaker, token) if token else None
        if principal is None:
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing, invalid or revoked API key",
                                headers={"WWW-Authenticate": "Bearer"})
    retry = request.app.state.rate_limiter.hit(principal.key_id)
    if retry is not None:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            f"rate limit: {settings.rate_limit_per_minute} requests per minute",
            headers={"Retry-After": str(retry)},
        )
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]
