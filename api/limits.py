"""A request body size limit (413), checked before anything parses the body."""

from __future__ import annotations

import json

from selfie_jobs.settings import Settings


def max_body_bytes(settings: Settings) -> int:
    """Room for the largest job the caps allow (a character may take 6 bytes as a JSON escape), plus 1 MiB."""
    return settings.max_prompts_per_job * settings.max_prompt_chars * 6 + (1 << 20)


class BodySizeLimit:
    """Pure ASGI middleware: refuses a declared Content-Length over the limit, and stops a streamed body there."""

    def __init__(self, app, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _too_large(send, self.limit)
        seen = 0
        started = False  # the app has begun its response
        refused = False  # the 413 went out

        async def limited_receive():
            nonlocal seen, refused
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    # Answered here, not by an exception handler: whatever reads the body (FastAPI's parsing, a
                    # multipart parser) may catch the exception below and answer something else, which is dropped.
                    if not started and not refused:
                        refused = True
                        await _too_large(send, self.limit)
                    raise _TooLarge
            return message

        async def guarded_send(message):
            nonlocal started
            if refused:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _TooLarge:
            if not refused:
                raise  # the response had begun: nothing to answer, the server drops the connection


class _TooLarge(Exception):
    pass


async def _too_large(send, limit: int) -> None:
    body = json.dumps({"detail": f"request body larger than {limit} bytes"}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
