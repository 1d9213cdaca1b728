"""A row lock that holds on SQLite as well as on PostgreSQL, for check-then-write steps."""

from __future__ import annotations

from typing import Any

from sqlalchemy import inspect, update
from sqlalchemy.orm import Session


def lock_row(session: Session, entity: type, row_id: Any) -> None:
    """Hold the row of `entity` with primary key `row_id` until the transaction ends.

    A no-op UPDATE (the key set to itself), not SELECT .. FOR UPDATE: SQLite ignores FOR UPDATE and pysqlite begins
    the transaction only at the first write, so a read holds nothing. The UPDATE takes SQLite's write lock (waiting
    on busy_timeout) and PostgreSQL's row lock (the weaker no-key kind, as the key keeps its value, so inserts that
    reference the row go on); what is read after it includes every transaction that held the lock before.
    """
    (key,) = inspect(entity).primary_key
    session.execute(
        update(entity).where(key == row_id).values({key.key: key}).execution_options(synchronize_session=False)
    )
