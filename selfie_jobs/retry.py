"""Retrying a unit of database work through transient outages (a restart, a failover, a busy database)."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

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

    Exponential backoff with jitter; non-transient errors are raised at once.
    """
    deadline = time.monotonic() + retry_seconds
    delay = first_delay
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - filtered just below
            if not is_transient(exc) or time.monotonic() + delay > deadline:
                raise
            log.warning("database unavailable (attempt %d), retrying in %.1fs: %s", attempt, delay, exc)
            sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, max_delay)
