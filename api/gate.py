"""Checks made before the app reads a request body: which route it is for, and whose API key asks.

An unauthenticated client must not make the API read (let alone parse) a body: `Authentication` answers 401 from
the request line and headers alone, in the ASGI layer, before FastAPI's body parsing. The routes that need a key
are the ones whose dependencies include `get_principal`, read from the app's own routes, so a public route
(health, pages, /docs, /metrics with its own token) stays public without a list to keep in step.

The key found here is handed to the route in the request's state (`get_principal` reads it there), so a request
costs one key lookup, in a short session of its own that holds no pooled connection for the rest of the request.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.routing import BaseRoute, Match

from api.errors import RETRY_AFTER_SECONDS
from selfie_jobs.auth import Principal, authenticate

log = logging.getLogger(__name__)

#: The scope key of the route a request is for (None: no route matched; the app answers 404/405 itself).
ROUTE_SCOPE_KEY = "selfie.route"
#: The request-state key of the principal the middleware authenticated.
PRINCIPAL_STATE_KEY = "principal"


def _flat_routes(routes) -> Iterator[BaseRoute]:
    """The app's routes with included routers opened up (FastAPI keeps an included router as one entry; its
    routes carry their full paths, since this app includes routers without an extra prefix)."""
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            yield from _flat_routes(included.routes)
        else:
            yield route


def route_for(scope: dict[str, Any]) -> BaseRoute | None:
    """The app route that serves this request (found once per request, then kept in the scope)."""
    if ROUTE_SCOPE_KEY not in scope:
        state = scope["app"].state
        routes = getattr(state, "flat_routes", None)
        if routes is None:  # the routes are all in place by the first request
            routes = state.flat_routes = list(_flat_routes(scope["app"].router.routes))
        scope[ROUTE_SCOPE_KEY] = next((r for r in routes if r.matches(scope)[0] == Match.FULL), None)
    return scope[ROUTE_SCOPE_KEY]


def _asks_for_key(dependant: Dependant) -> bool:
    from api.deps import get_principal

    return any(d.call is get_principal or _asks_for_key(d) for d in dependant.dependencies)


def lookup_principal(maker: sessionmaker[Session], secret: str) -> Principal | None:
    """The live key for `secret` as a Principal, read in a session that is closed before this returns."""
    with maker() as session:
        key = authenticate(session, secret)
        return None if key is None else Principal(key_id=key.id, is_admin=key.is_admin, name=key.name)


def bearer_token(authorization: str | None) -> str | None:
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def has_body(scope: dict[str, Any]) -> bool:
    headers = Headers(scope=scope)
    return headers.get("content-length", "0") != "0" or "transfer-encoding" in headers


async def send_json(send, status: int, detail: str, headers: dict[str, str] | None = None, *,
                    close: bool = False) -> None:
    """A complete JSON error response sent straight to the server (the app and its body are never reached).

    `close`: the request's body is left unread, so the connection cannot carry another request; the server
    closes it after this response instead of reading (and discarding) the rest of the body."""
    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        raw.append((b"connection", b"close"))
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class Authentication:
    """Pure ASGI middleware: a route that needs an API key gets 401 here when the key is missing or not live."""

    def __init__(self, app) -> None:
        self.app = app
        self._needs_key: dict[int, bool] = {}

    def needs_key(self, route: BaseRoute | None) -> bool:
        if not isinstance(route, APIRoute):
            return False  # no route (404/405 from the app), static files, the docs
        if id(route) not in self._needs_key:
            self._needs_key[id(route)] = _asks_for_key(route.dependant)
        return self._needs_key[id(route)]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope["app"].state
        if not state.settings.auth_enabled or not self.needs_key(route_for(scope)):
            return await self.app(scope, receive, send)
        unauthorized = {"WWW-Authenticate": "Bearer"}
        close = has_body(scope)
        token = bearer_token(Headers(scope=scope).get("authorization"))
        if token is None:
            return await send_json(send, 401, "missing bearer token (an API key)", unauthorized, close=close)
        try:
            principal = await run_in_threadpool(lookup_principal, state.sessionmaker, token)
        except (OperationalError, PoolTimeoutError) as exc:
            # raised outside the app's exception handlers: answered here as they would answer it
            log.warning("database unavailable while authenticating: %s", exc)
            return await send_json(send, 503, "the database is unavailable; retry later",
                                   {"Retry-After": str(RETRY_AFTER_SECONDS)}, close=close)
        if principal is None:
            return await send_json(send, 401, "invalid or revoked API key", unauthorized, close=close)
        scope.setdefault("state", {})[PRINCIPAL_STATE_KEY] = principal
        await self.app(scope, receive, send)
