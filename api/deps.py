"""Request dependencies: settings, one typed database session, the asking principal, the task sender."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker

from selfie_jobs.auth import LOCAL_PRINCIPAL, Principal, authenticate
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
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    settings: Settings = request.app.state.settings
    if not settings.auth_enabled:
        return LOCAL_PRINCIPAL
    unauthorized = {"WWW-Authenticate": "Bearer"}
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing bearer token (an API key)", headers=unauthorized)
    key = authenticate(session, credentials.credentials)
    if key is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid or revoked API key", headers=unauthorized)
    retry = request.app.state.rate_limiter.hit(key.id)
    if retry is not None:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            f"rate limit: {settings.rate_limit_per_minute} requests per minute",
            headers={"Retry-After": str(retry)},
        )
    return Principal(key_id=key.id, is_admin=key.is_admin, name=key.name)


PrincipalDep = Annotated[Principal, Depends(get_principal)]
