"""A row lock that holds on SQLite as well as on PostgreSQL, for check-then-write steps."""

from __future__ import annotations

from typing import Any

from sqlalchemy import inspect, update
from sqlalchemy.orm import Session


def lock_row(session: Session, entity: type, row_id: Any) -> None:
    """Hold the row of `entity` with primary key `row_id` until the transaction ends.

    A no-op UPDATE, not SELECT .. FOR UPDATE: SQLite ignores FOR UPDATE and pysqlite begins the transaction only at
    the first write, so a read holds nothing. The UPDATE takes SQLite's write lock (waiting on busy_timeout) and
    PostgreSQL's row lock; what is read after it includes every transaction that held the lock before. It sets a
    plain column (no key, no index, no foreign key) to itself: setting the primary key made SQLite check every row
    that references it, all of a key's jobs on each submit.
    """
    mapper = inspect(entity)
    (key,) = mapper.primary_key
    column = next(c for c in mapper.columns
                  if not (c.primary_key or c.unique or c.foreign_keys or c.index) and c.table is key.table)
    # columns with an onupdate default (updated_at) keep their value too: nothing about the row changes
    unchanged = {c.key: c for c in mapper.columns if c.onupdate is not None or c is column}
    session.execute(
        update(entity).where(key == row_id).values(unchanged).execution_options(synchronize_session=False)
    )
