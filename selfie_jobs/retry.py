"""A unit of work: one transaction in a session of its own, retried whole through transient database outages
(a restart, a failover, a busy database).

The commit rule (docs/architecture.md): orchestrators (routes, task bodies, the use cases that span a transaction
and a broker send) commit; domain functions take a Session, flush at most, and leave the commit to their caller.
An orchestrator that should wait out an outage runs its transaction through `unit_of_work`.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_before_delay, wait_exponential

log = logging.getLogger(__name__)

T = TypeVar("T")


def is_transient(exc: BaseException) -> bool:
    """Errors worth retrying: the database went away or was busy (or its pool or write gate was, see
    `selfie_jobs.db.DatabaseBusy`), not a bug in the statement."""
    if isinstance(exc, (OperationalError, PoolTimeoutError)):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def with_db_retry(
    fn: Callable[[], T],
    retry_seconds: float,
    *,
    first_delay: float = 0.2,
    max_delay: float = 5.0,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run `fn` (a whole unit of work: open session, work, commit) until it succeeds or `retry_seconds` pass.

    Exponential backoff with jitter; non-transient errors are raised at once, and so is a transient one when the
    next pause would end past the deadline.
    """
    backoff = wait_exponential(multiplier=first_delay, max=max_delay)

    def jittered(state: RetryCallState) -> float:
        # spread the retries of many processes that lost the database at the same moment
        return backoff(state) * (0.5 + random.random())

    def warn(state: RetryCallState) -> None:
        log.warning("database unavailable (attempt %d), retrying in %.1fs: %s", state.attempt_number,
                    state.upcoming_sleep, state.outcome.exception())

    retrying = Retrying(retry=retry_if_exception(is_transient), wait=jittered,
                        stop=stop_before_delay(retry_seconds), before_sleep=warn, sleep=sleep, reraise=True)
    return retrying(fn)


def unit_of_work(sessions: Callable[[], Session], work: Callable[[Session], T], retry_seconds: float = 0.0) -> T:
    """Run `work(session)` in one transaction of a new session: committed when it returns, rolled back when it
    raises. A transient database error starts the whole unit again (with a new session), with backoff, until
    `retry_seconds` pass; 0 runs it once."""

    def attempt() -> T:
        with sessions() as session, session.begin():
            return work(session)

    return with_db_retry(attempt, retry_seconds) if retry_seconds > 0 else attempt()
