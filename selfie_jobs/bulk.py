"""Result rows into their table fast: one INSERT .. ON CONFLICT DO NOTHING per table and dialect, compiled once
and run as the driver's `executemany` (psycopg pipelines it; sqlite3 loops in C).

Building a multi-row `insert().values([...])` per call made SQLAlchemy compile a new statement every time (most of
a write's time in a profile, benchmarks/README.md "Result writes"); a cached Core statement still pays SQLAlchemy's
per-row parameter handling. Here the statement is compiled once, and each row goes to the driver as a plain tuple or
dict after the columns' own bind processors (JSON, datetimes on SQLite, any TypeDecorator such as a binary relevancy
column), so what is stored is exactly what a Core insert would store.

The count of inserted rows is the driver's rowcount: both drivers sum it over an `executemany`, and a row skipped by
the unique key counts zero, so the count is the rows that are new.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Session


@dataclass(frozen=True)
class BulkInsert:
    """A compiled INSERT .. ON CONFLICT DO NOTHING of `columns` into one table, for one dialect."""

    sql: str
    columns: tuple[str, ...]
    processors: tuple[Callable[[Any], Any] | None, ...]
    positional: bool

    def parameters(self, shared: Mapping[str, Any], rows: Iterable[Mapping[str, Any]]) -> list[Any]:
        """The driver's parameter sets: `shared` (the same for every row: job, chunk, timestamps) and each row's own
        values, in column order, through the columns' bind processors (the shared ones once)."""
        processed = {c: shared[c] if p is None else p(shared[c])
                     for c, p in zip(self.columns, self.processors) if c in shared}
        own = [(i, c, p) for i, (c, p) in enumerate(zip(self.columns, self.processors)) if c not in shared]
        template = [processed.get(c) for c in self.columns]
        out: list[Any] = []
        for row in rows:
            values = list(template)
            for i, c, p in own:
                values[i] = row[c] if p is None else p(row[c])
            out.append(tuple(values) if self.positional else dict(zip(self.columns, values)))
        return out

    def run(self, session: Session, shared: Mapping[str, Any], rows: Iterable[Mapping[str, Any]]) -> int:
        """Insert the rows in the session's transaction; returns how many were new."""
        params = self.parameters(shared, rows)
        if not params:
            return 0
        result = session.connection().exec_driver_sql(self.sql, params)
        return max(result.rowcount or 0, 0)


_CACHE: dict[tuple[str, str, tuple[str, ...], tuple[str, ...]], BulkInsert] = {}
_CACHE_LOCK = threading.Lock()


def bulk_insert(session: Session, table: Table, columns: tuple[str, ...], unique: tuple[str, ...]) -> BulkInsert:
    """The cached compiled insert of `columns` into `table` for the session's dialect, skipping rows whose `unique`
    columns are already present."""
    dialect = session.get_bind().dialect
    key = (dialect.name, table.name, columns, unique)
    found = _CACHE.get(key)
    if found is None:
        with _CACHE_LOCK:
            found = _CACHE.get(key) or _compile(dialect, table, columns, unique)
            _CACHE[key] = found
    return found


def _compile(dialect: Dialect, table: Table, columns: tuple[str, ...], unique: tuple[str, ...]) -> BulkInsert:
    if dialect.name == "postgresql":
        stmt = postgresql.insert(table)
    elif dialect.name == "sqlite":
        stmt = sqlite.insert(table)
    else:
        raise NotImplementedError(f"no INSERT .. ON CONFLICT DO NOTHING for dialect {dialect.name!r}")
    stmt = stmt.on_conflict_do_nothing(index_elements=list(unique))
    compiled = stmt.compile(dialect=dialect, column_keys=list(columns))
    positional = bool(compiled.positional)
    order = tuple(compiled.positiontup) if positional else columns
    if set(order) != set(columns):
        raise RuntimeError(f"the compiled insert into {table.name} binds {order}, not the columns {columns}")
    processors = tuple(table.c[c].type.dialect_impl(dialect).bind_processor(dialect) for c in order)
    return BulkInsert(sql=compiled.string, columns=order, processors=processors, positional=positional)
