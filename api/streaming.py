"""Streamed responses that close their source as soon as the response ends, however it ends.

A CSV export is a generator that holds a database session for as long as it streams (on PostgreSQL a COPY, whose
connection psycopg keeps locked between two pieces). When the client goes away part way, Starlette stops asking
for pieces but never closes the generator: it was left to the garbage collector, which, finding it in a reference
cycle, finalized the session's connection first; that connection's rollback then waited for the COPY's lock, which
only closing the generator would release, and the collecting thread hung with it (connections piled up until the
pool was exhausted and the API answered 503). Here the generator is closed when the response's task ends, in a
worker thread (closing a COPY cancels it and drains it), shielded from the cancellation that ended the response.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse of a generator run in the thread pool, closed when the response ends."""

    def __init__(self, content: Iterator[Any], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._source = content

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            close = getattr(self._source, "close", None)
            if close is not None:
                # No thread runs the generator now: Starlette's task group waited for its last next() to return.
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(close)
