"""Whether a worker is alive: the one predicate that claims, the reconciler, the model list and metrics all use.

A worker is alive while its row in `workers` heartbeats (newer than `worker_alive_seconds`) and is not marked
gone (dead, stopped, failed to load). A caller on the worker's own host can tell more: a process that no longer
exists is dead at once, which is how a restarted worker takes over its killed predecessor's chunks without waiting
for the heartbeat to age.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, and_, select
from sqlalchemy.orm import Session

from selfie_jobs.models import Worker, utcnow

#: Worker row states that mean "this owner will never finish its chunks".
GONE_WORKER_STATES = frozenset({"dead", "stopped", "load_failed"})


def is_alive(alive_seconds: float, now: datetime | None = None) -> ColumnElement[bool]:
    """The SQL condition on `workers` rows: heartbeat recent enough and not marked gone."""
    since = (now or utcnow()) - timedelta(seconds=alive_seconds)
    return and_(Worker.last_heartbeat >= since, Worker.state.not_in(GONE_WORKER_STATES))


def pid_alive(pid: int) -> bool:
    """Whether a process of this host with this pid exists (one we may not signal exists too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def live_workers(
    session: Session, alive_seconds: float, *, model: str | None = None, now: datetime | None = None
) -> list[Worker]:
    """The live workers (of `model`, if given), by name."""
    query = select(Worker).where(is_alive(alive_seconds, now))
    if model is not None:
        query = query.where(Worker.model == model)
    return list(session.scalars(query.order_by(Worker.name)).all())


def live_worker_names(session: Session, alive_seconds: float, *, now: datetime | None = None) -> set[str]:
    return set(session.scalars(select(Worker.name).where(is_alive(alive_seconds, now))).all())


def owner_is_alive(
    session: Session, owner: str | None, alive_seconds: float, *, hostname: str | None = None, now: datetime | None = None
) -> bool:
    """Whether a chunk owner may still finish: it is a live worker, and, when the caller runs on the owner's host
    (`hostname`), its process still exists."""
    if not owner:
        return False
    row = session.connection().execute(select(Worker.hostname, Worker.pid)
                                       .where(Worker.name == owner, is_alive(alive_seconds, now))).first()
    if row is None:
        return False
    return not (hostname is not None and row.hostname == hostname and not pid_alive(row.pid))


__all__ = ["GONE_WORKER_STATES", "is_alive", "live_worker_names", "live_workers", "owner_is_alive", "pid_alive"]
