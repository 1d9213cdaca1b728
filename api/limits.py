"""Request body limits per route (413), checked before anything parses the body.

`BODY_LIMITS` says what each route that takes a large body may receive; every other route gets the small
`max_body_bytes` (audit definitions and changes are JSON of a few kilobytes). A new route with a large body is
one more line here, with the setting that sizes it. A route marked
`streamed` reads its body in pieces (the multipart parser spools a file to disk), so its larger limit costs disk,
not memory; a JSON route's limit is what its parser may hold in memory at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from api.gate import route_for, send_json
from selfie_jobs.settings import Settings


@dataclass(frozen=True)
class BodyLimit:
    method: str
    path: str  # the route's path as declared, e.g. "/v1/jobs" or "/v1/jobs/{job_id}/vectors"
    limit: Callable[[Settings], int]
    streamed: bool = False


def job_body_bytes(settings: Settings) -> int:
    """A job's JSON: room for the most prompt text the caps allow (a character may take 6 bytes as a JSON escape)
    plus 64 KiB for the rest, but never more than `max_job_body_bytes` (the caps multiply up to 120 MB, which no
    job needs in one request)."""
    return min(settings.max_job_body_bytes, settings.max_prompts_per_job * settings.max_prompt_chars * 6 + (1 << 16))


BODY_LIMITS: tuple[BodyLimit, ...] = (
    BodyLimit("POST", "/v1/jobs", job_body_bytes),
    # a lenses job's body is an interpret job's (prompts and targets) and two small fields
    BodyLimit("POST", "/v1/jobs/lenses", job_body_bytes),
    # a generate job's body: prompts, a system prompt and a few small fields
    BodyLimit("POST", "/v1/jobs/generate", job_body_bytes),
    # a JSONL / CSV file, spooled to disk by the multipart parser and read row by row
    BodyLimit("POST", "/v1/prompt-sets", lambda s: s.max_upload_bytes, streamed=True),
    # vectors as JSON: about 20 bytes a number, so a few hundred vectors of a large model; more go as a file
    BodyLimit("POST", "/v1/jobs/vectors", lambda s: s.max_job_body_bytes),
    # a .npy / .safetensors file (the route reads at most max_vector_upload_bytes of it) plus the options form
    # field (at most 1 MiB) and the multipart framing
    BodyLimit("POST", "/v1/jobs/vectors/upload", lambda s: s.max_vector_upload_bytes + (2 << 20), streamed=True),
)


def body_limit(settings: Settings, method: str, path: str | None) -> int:
    """The most bytes a request to `method path` (a declared route path; None: no route) may send."""
    for rule in BODY_LIMITS:
        if rule.method == method and rule.path == path:
            return rule.limit(settings)
    return settings.max_body_bytes


class BodySizeLimit:
    """Pure ASGI middleware: refuses a declared Content-Length over the route's limit, and stops a streamed body
    there."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = route_for(scope)
        limit = body_limit(scope["app"].state.settings, scope["method"], getattr(route, "path", None))
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _too_large(send, limit)
        seen = 0
        started = False  # the app has begun its response
        refused = False  # the 413 went out

        async def limited_receive():
            nonlocal seen, refused
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    # Answered here, not by an exception handler: whatever reads the body (FastAPI's parsing, a
                    # multipart parser) may catch the exception below and answer something else, which is dropped.
                    if not started and not refused:
                        refused = True
                        await _too_large(send, limit)
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
    await send_json(send, 413, f"request body larger than {limit} bytes", close=True)


__all__ = ["BODY_LIMITS", "BodyLimit", "BodySizeLimit", "body_limit", "job_body_bytes"]
