"""Overload sheds load with 503 + Retry-After, never 500, and never by collapsing.

One API process serves at most `max_concurrent_requests` requests at once (with two threads and two pooled
connections each, so a request never waits for a thread or a connection that another admitted request holds);
the others wait in line, first come first served, for up to `queue_wait_seconds`, then get 503 with Retry-After.
Without the line, a burst of
submitters held pooled connections while waiting for threads that were themselves waiting for connections: every
request timed out (benchmarks/README.md, "Submit load").
"""

from __future__ import annotations

import asyncio
import logging

from api.errors import RETRY_AFTER_SECONDS
from api.gate import has_body, send_json
from api.routes.events import EVENTS_PATH

log = logging.getLogger(__name__)

#: Answered without waiting in line: liveness must not look dead because the service is busy.
UNQUEUED_PATHS = frozenset({"/healthz"})


class ConcurrencyLimit:
    """Pure ASGI middleware: a bounded number of requests in the app, a bounded wait for the others."""

    def __init__(self, app, limit: int, wait_seconds: float) -> None:
        self.app = app
        self.limit = limit
        self.wait_seconds = wait_seconds
        self._slots: asyncio.Semaphore | None = None  # made on the server's event loop, at the first request

    async def __call__(self, scope, receive, send):
        # An event stream lasts as long as its job: in the line it would hold a slot for that long. Streams have
        # their own bound per process (api.routes.events, max_event_streams) and hold no connection between polls.
        if scope["type"] != "http" or scope["path"] in UNQUEUED_PATHS or EVENTS_PATH.fullmatch(scope["path"]):
            return await self.app(scope, receive, send)
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.limit)
        try:
            await asyncio.wait_for(self._slots.acquire(), self.wait_seconds)
        except TimeoutError:
            log.warning("overloaded: a request waited %.0f s for one of %d slots; answered 503",
                        self.wait_seconds, self.limit)
            return await send_json(send, 503, f"the service is overloaded ({self.limit} requests in progress); "
                                   "retry later", {"Retry-After": str(RETRY_AFTER_SECONDS)}, close=has_body(scope))
        try:
            await self.app(scope, receive, send)
        finally:
            self._slots.release()
