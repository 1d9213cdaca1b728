"""The job domain's refusals: what a caller asked that the domain will not do, and why.

Domain functions raise these; they never build HTTP responses. The API translates every `DomainError` in one place
(`api/errors.py`), and `status` is the HTTP status that translation answers with, chosen where the refusal is raised
because only there is it known whether a request was malformed (422), too large (413), over quota (429), in
conflict (409) or about something that is not there (404).
"""

from __future__ import annotations


class DomainError(Exception):
    """A request the domain refuses. `field` names the request field at fault, `retry_after` (seconds) says when the
    same request may succeed."""

    status: int = 422

    def __init__(self, message: str, *, field: str | None = None, status: int | None = None,
                 retry_after: int | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        if status is not None:
            self.status = status
        self.retry_after = retry_after


class NotFound(DomainError):
    """The thing asked about does not exist, or the caller may not see it (the two read alike on purpose)."""

    status = 404


class Conflict(DomainError):
    """The request collides with stored state (a name taken, an idempotency key used for another request)."""

    status = 409


class BadQuery(DomainError):
    """A malformed filter, sort or cursor of a listing."""

    status = 400


class SubmissionError(DomainError):
    """A job request the service refuses (invalid against the model card, too large, over quota, or an idempotency
    key reused for another request)."""


__all__ = ["BadQuery", "Conflict", "DomainError", "NotFound", "SubmissionError"]
