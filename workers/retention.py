"""`selfie.purge` (beat, every `purge_interval_seconds`, on the control queue): delete the expired jobs and what
hangs off them. A thin wrapper over `selfie_jobs.retention.purge_expired`, which is safe to run twice or cut short:
each of its transactions re-checks what it deletes, and the next purge goes on where one stopped."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery import Celery
from sqlalchemy.orm import Session

from selfie_jobs.queue import CONTROL_QUEUE, PURGE_TASK
from selfie_jobs.retention import purge_expired
from selfie_jobs.settings import Settings

#: A purge past this is stopped (its open transaction rolls back) and the next one continues.
PURGE_SOFT_TIME_LIMIT_SECONDS = 1800


def beat_entries(settings: Settings) -> dict[str, dict[str, Any]]:
    """The purge's beat schedule entry (merged into the Celery app's beat_schedule)."""
    period = settings.purge_interval_seconds
    # A purge message that waited a whole period is stale: the next one does the same work.
    return {"purge": {"task": PURGE_TASK, "schedule": period, "options": {"queue": CONTROL_QUEUE, "expires": period}}}


def register_retention_tasks(app: Celery, settings: Settings, sessions: Callable[[], Session] | None = None) -> None:
    if sessions is None:
        from selfie_jobs.db import get_sessionmaker

        def sessions() -> Session:
            return get_sessionmaker(settings.resolved_database_url())()

    # shared=False: the task closes over these settings, so it must not be lent to other apps of the process.
    @app.task(name=PURGE_TASK, shared=False, ignore_result=True, soft_time_limit=PURGE_SOFT_TIME_LIMIT_SECONDS,
              time_limit=PURGE_SOFT_TIME_LIMIT_SECONDS + 60)
    def purge_task() -> dict[str, int]:
        return purge_expired(sessions, settings).as_dict()
