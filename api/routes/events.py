"""GET /v1/jobs/{id}/events: a job's status pushed as server-sent events (sse-starlette), until the job is final.

Events: `status` (the job's status, as GET /v1/jobs/{id}?include_prompts=false answers it) at the start and whenever
its state, progress, chunks or wait reason change; `end` (the final status) once, after which the stream closes;
`error` (a detail) if the job can no longer be read, the key that opened the stream was revoked, or the database
stayed away longer than `db_retry_seconds`, after which the stream closes. Comment lines (`: ping`) keep idle
connections open, also while a poll fails because the database is briefly away (that poll is skipped).

A stream holds no database connection between its polls: each poll is a short session in a worker thread. Streams
are long, so they do not wait in the API's request line (`api.overload`); instead each API process serves at most
`max_event_streams` at once and answers 503 with Retry-After past that (clients then poll).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time

import anyio.to_thread
from fastapi import APIRouter, Request
from sse_starlette import EventSourceResponse

from api.deps import PrincipalDep, SessionMakerDep, SettingsDep
from api.errors import RETRY_AFTER_SECONDS
from api.routes.jobs import base_url, job_status
from api.schemas import ErrorOut, JobStatus
from selfie_jobs.auth import key_revoked
from selfie_jobs.errors import DomainError, NotFound
from selfie_jobs.retry import is_transient
from selfie_jobs.states import FINAL_JOB_STATES

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

#: The paths of event streams (exempt from the request line of `api.overload`: they have their own bound).
EVENTS_PATH = re.compile(r"/v1/jobs/[^/]+/events")


class StreamSlots:
    """At most `limit` event streams at once in this process (touched on the event loop only)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0

    def take(self) -> bool:
        if self.open >= self.limit:
            return False
        self.open += 1
        return True

    def give_back(self) -> None:
        self.open -= 1


class KeyNoLongerValid(Exception):
    """The key that opened a stream was revoked (or deleted) while the stream was open."""


def _read(maker, job_id: str, who, base: str, settings, check_key: bool = False) -> JobStatus:
    with maker() as session:
        # The key was checked when the stream opened; a stream outlives that check, so each poll repeats it (one
        # primary-key read in the poll's own session).
        if check_key and key_revoked(session, who.key_id):
            raise KeyNoLongerValid
        return job_status(session, job_id, who, base, settings, include_prompts=False)


def _changes(status: JobStatus) -> tuple:
    """What makes an event worth sending (timings alone advance every poll)."""
    return (status.state, status.progress, status.chunks, status.waiting, status.queue_position, status.error,
            status.edit)


@router.get(
    "/{job_id}/events",
    responses={200: {"content": {"text/event-stream": {}}, "description": "Server-sent events: `status` (a JobStatus "
                     "without prompts) on every change, `end` (the final JobStatus) once, then the stream closes."},
               401: {"model": ErrorOut}, 404: {"model": ErrorOut},
               503: {"model": ErrorOut, "description": "Too many event streams open; poll GET /v1/jobs/{id}."}},
    summary="Follow a job: its status as server-sent events until it is final",
)
async def job_events(job_id: str, request: Request, who: PrincipalDep, settings: SettingsDep,
                     maker: SessionMakerDep) -> EventSourceResponse:
    base = base_url(request, settings)
    if not re.fullmatch(r"[0-9a-f]{32}", job_id):
        raise NotFound(f"no job {job_id!r}")
    first = await anyio.to_thread.run_sync(_read, maker, job_id, who, base, settings)
    slots: StreamSlots = request.app.state.event_streams
    if not slots.take():
        log.warning("event streams: all %d in use; answered 503", slots.limit)
        raise DomainError(f"too many event streams are open ({slots.limit}); poll GET /v1/jobs/{job_id} instead",
                          status=503, retry_after=RETRY_AFTER_SECONDS)

    async def events():
        status, sent, failing_since = first, None, None
        while True:
            if status.state in FINAL_JOB_STATES:
                yield {"event": "end", "data": status.model_dump_json()}
                return
            if _changes(status) != sent:
                sent = _changes(status)
                yield {"event": "status", "data": status.model_dump_json()}
            await asyncio.sleep(settings.event_poll_seconds)
            try:
                status = await anyio.to_thread.run_sync(_read, maker, job_id, who, base, settings, True)
            except NotFound as exc:
                yield {"event": "error", "data": exc.message}
                return
            except KeyNoLongerValid:
                yield {"event": "error", "data": "the API key of this stream is no longer valid"}
                return
            except Exception as exc:  # noqa: BLE001 - a stream ends with an `error` event, never a traceback
                if not is_transient(exc):
                    log.exception("event stream of job %s: reading its status failed", job_id)
                    yield {"event": "error", "data": "the job's status could not be read"}
                    return
                if failing_since is None:  # once per outage, not once per poll
                    failing_since = time.monotonic()
                    log.warning("event stream of job %s: polls skipped while the database is unavailable: %s",
                                job_id, exc)
                if time.monotonic() - failing_since > settings.db_retry_seconds:
                    log.warning("event stream of job %s: the database is away for over %.0f s; ending the "
                                "stream: %s", job_id, settings.db_retry_seconds, exc)
                    yield {"event": "error", "data": "the database is unavailable; poll GET /v1/jobs/"
                                                     f"{job_id} later"}
                    return
                # Skip this poll and keep the stream (and its keep-alives) going: the status is sent once a poll
                # reads it again.
            else:
                failing_since = None

    return SlotResponse(slots, events(), ping=settings.event_ping_seconds,
                        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


class SlotResponse(EventSourceResponse):
    """Gives its stream slot back however the response ends (the job final, the client gone, an error), also when
    the client left before the first event (the generator then never starts, and its own `finally` would not run)."""

    def __init__(self, slots: StreamSlots, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._slots = slots

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._slots.give_back()
