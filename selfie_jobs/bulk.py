"""Result rows into their table fast: one INSERT .. ON CONFLICT DO NOTHING per table and dialect, compiled once.

On PostgreSQL it is ONE statement per call whatever the number of rows: each per-row column goes as one typed array
parameter and the rows come out of `unnest`, the values shared by every row (job, chunk, timestamps) as plain
parameters: INSERT INTO t (..) SELECT :job_id, .., u.* FROM unnest(CAST(:col AS type[]), ..) AS u(..) ON CONFLICT
(key) DO NOTHING. The write path has the job's id read from the chunk's row instead (`chunks`: .. SELECT
chunks.job_id, .. FROM chunks, unnest(..) WHERE chunks.id = :chunk_id), so it needs no statement to find it. A
pipelined `executemany` of the same rows ran one execution per row on the server (about half of a write's time);
this is one parse, one plan, one execution (benchmarks/README.md "Database cycle"). Rows that repeat a key within
one call are skipped like rows already stored: DO NOTHING skips a row that conflicts with one the same statement
inserted, and `unnest` returns the rows in array order (a function scan; nothing in the plan reorders them), so the
first one is kept, as a loop would. On SQLite it runs as the driver's `executemany` (sqlite3 loops in C), the job's
id read from the chunk's row the same way when asked.

Building a multi-row `insert().values([...])` per call made SQLAlchemy compile a new statement every time (most of
a write's time in a profile, benchmarks/README.md "Result writes"); a cached Core statement still pays SQLAlchemy's
per-row parameter handling. Here the statement is compiled once, and each value goes to the driver after its
column's own bind processor (JSON, datetimes on SQLite, any TypeDecorator such as a binary relevancy column; on
PostgreSQL applied to each element of the column's array), so what is stored is exactly what a Core insert of the
rows would store, NULLs included. A column that is itself an array (the float32 relevancy lists, `real[]` on
PostgreSQL) cannot be one element of an array `unnest` returns row by row (unnest of a 2-D array returns its
scalars, and a 2-D array's rows must have one length): its lists go as ONE flat float array, and each row takes
its slice, `CAST(:col AS REAL[])[u.col__first:u.col__last]` (1-based, inclusive; an empty list's slice is empty).

The count of inserted rows is the driver's rowcount: the rows the one statement inserted, or the sum over an
`executemany`; a row skipped by the unique key counts zero, so the count is the rows that are new.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

from sqlalchemy import Boolean, Float, Integer, Table, bindparam, cast, column, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import Grouping
from sqlalchemy.types import REAL

from selfie_jobs.float_arrays import Float4ArrayBinary, Float32List


@dataclass(frozen=True)
class BulkInsert:
    """A compiled INSERT .. ON CONFLICT DO NOTHING of `columns` into one table, for one dialect.

    `arrays` (PostgreSQL): one execution for all rows, each column not in `shared` bound as the array of its values;
    otherwise one parameter set per row, run as an `executemany`."""

    sql: str
    columns: tuple[str, ...]
    processors: tuple[Callable[[Any], Any] | None, ...]
    positional: bool
    arrays: bool = False
    #: With `arrays`: the list columns bound as one flat float32 array and each row's first and last positions in
    #: it (`<name>__first`, `<name>__last`).
    flattened: frozenset[str] = frozenset()

    def parameters(self, shared: Mapping[str, Any], rows: Iterable[Mapping[str, Any]]) -> list[Any]:
        """The driver's parameter sets: `shared` (the same for every row: job, chunk, timestamps) and each row's own
        values, in column order, through the columns' bind processors (the shared ones once). With `arrays`, one
        set (or none for no rows) whose own columns are lists of every row's value."""
        processed = {c: shared[c] if p is None else p(shared[c])
                     for c, p in zip(self.columns, self.processors) if c in shared}
        own = [(i, c, p) for i, (c, p) in enumerate(zip(self.columns, self.processors)) if c not in shared]
        if self.arrays:
            rows = list(rows)
            if not rows:
                return []
            for _, c, p in own:
                if c in self.flattened:
                    processed[c], processed[c + "__first"], processed[c + "__last"] = _flatten(row[c] for row in rows)
                else:
                    processed[c] = [row[c] for row in rows] if p is None else [p(row[c]) for row in rows]
            return [processed]
        if self.positional and own and [i for i, _, _ in own] == list(range(own[0][0], own[-1][0] + 1)):
            # the row's own values between the shared ones before and after them (SQLite's INSERT .. SELECT binds
            # the chunk's id again at its end): one C call takes them out of the row, a loop only for those with a
            # bind processor (JSON, float32 bytes). A fifth of a SQLite write's Python was the loop over every value.
            first, last = own[0][0], own[-1][0]
            head = tuple(processed.get(c) for c in self.columns[:first])
            tail = tuple(processed.get(c) for c in self.columns[last + 1:])
            take = itemgetter(*(c for _, c, _ in own))
            convert = [(j, p) for j, (_, _, p) in enumerate(own) if p is not None]
            out = []
            for row in rows:
                values = take(row) if len(own) > 1 else (take(row),)
                if convert:
                    values = list(values)
                    for j, p in convert:
                        values[j] = p(values[j])
                out.append((*head, *values, *tail))
            return out
        template = [processed.get(c) for c in self.columns]
        out = []
        for row in rows:
            values = list(template)
            for i, c, p in own:
                values[i] = row[c] if p is None else p(row[c])
            out.append(tuple(values) if self.positional else dict(zip(self.columns, values)))
        return out

    def run(self, session: Session, shared: Mapping[str, Any], rows: Iterable[Mapping[str, Any]]) -> int:
        """Insert the rows in the session's transaction; returns how many were new."""
        return self.execute(session, self.parameters(shared, rows))

    def execute(self, session: Session, params: list[Any]) -> int:
        """Insert rows whose parameters `parameters` built (perhaps before a lock was taken); how many were new."""
        if not params:
            return 0
        result = session.connection().exec_driver_sql(self.sql, params[0] if self.arrays else params)
        return max(result.rowcount or 0, 0)


_CACHE: dict[tuple[Any, ...], BulkInsert] = {}
_CACHE_LOCK = threading.Lock()


def bulk_insert(session: Session, table: Table, columns: tuple[str, ...], unique: tuple[str, ...],
                shared: tuple[str, ...] = (), chunks: Table | None = None) -> BulkInsert:
    """The cached compiled insert of `columns` into `table` for the session's dialect, skipping rows whose `unique`
    columns are already present. `shared`: the columns whose value is the same for every row of a call (bound
    once on PostgreSQL). `chunks`: `job_id` is not a parameter but the `job_id` of the row of this
    table whose `id` is the `chunk_id` parameter, and nothing is inserted when there is no such row."""
    dialect = session.get_bind().dialect
    key = (dialect.name, table.name, columns, unique, shared, chunks)
    found = _CACHE.get(key)
    if found is None:
        with _CACHE_LOCK:
            found = _CACHE.get(key) or _compile(dialect, table, columns, unique, shared, chunks)
            _CACHE[key] = found
    return found


def _compile(dialect: Dialect, table: Table, columns: tuple[str, ...], unique: tuple[str, ...],
             shared: tuple[str, ...], chunks: Table | None) -> BulkInsert:
    if dialect.name == "postgresql":
        return _compile_unnest(dialect, table, columns, unique, shared, chunks)
    if dialect.name != "sqlite":
        raise NotImplementedError(f"no INSERT .. ON CONFLICT DO NOTHING for dialect {dialect.name!r}")
    if chunks is None:
        stmt = sqlite.insert(table).on_conflict_do_nothing(index_elements=list(unique))
        compiled = stmt.compile(dialect=dialect, column_keys=list(columns))
    else:  # INSERT INTO t (..) SELECT chunks.job_id, ?, .. FROM chunks WHERE chunks.id = ? ON CONFLICT .., per row
        values = {c: chunks.c.job_id if c == "job_id" else bindparam(c, type_=table.c[c].type) for c in columns}
        source = select(*values.values()).where(chunks.c.id == values["chunk_id"])
        stmt = sqlite.insert(table).from_select(list(columns), source) \
            .on_conflict_do_nothing(index_elements=list(unique))
        compiled = stmt.compile(dialect=dialect)
    positional = bool(compiled.positional)
    order = tuple(compiled.positiontup) if positional else columns
    bound = set(columns) - ({"job_id"} if chunks is not None else set())
    if set(order) != bound:
        raise RuntimeError(f"the compiled insert into {table.name} binds {order}, not the columns {columns}")
    processors = tuple(table.c[c].type.dialect_impl(dialect).bind_processor(dialect) for c in order)
    return BulkInsert(sql=compiled.string, columns=order, processors=processors, positional=positional)


def _compile_unnest(dialect: Dialect, table: Table, columns: tuple[str, ...], unique: tuple[str, ...],
                    shared: tuple[str, ...], chunks: Table | None) -> BulkInsert:
    """INSERT INTO t (shared.., own..) SELECT :shared.., u.own.. FROM unnest(CAST(:own AS type[]), ..) AS u(own..)
    ON CONFLICT (unique) DO NOTHING, each parameter named after its column; with `chunks`, the job's id comes from
    the chunk's row (.. SELECT chunks.job_id, :chunk_id, .. FROM chunks, unnest(..) WHERE chunks.id = :chunk_id)."""
    own = tuple(c for c in columns if c not in shared)
    scalars = tuple(c for c in columns if c in shared)
    flattened = frozenset(c for c in own if isinstance(table.c[c].type, Float32List))
    unnested: list[tuple[str, Any]] = []  # (name, element type) of each array that unnest returns row by row
    for c in own:
        if c in flattened:
            unnested += [(c + "__first", Integer()), (c + "__last", Integer())]
        else:
            unnested.append((c, table.c[c].type))
    rows = func.unnest(*[cast(bindparam(name), postgresql.ARRAY(type_)) for name, type_ in unnested]) \
        .table_valued(*[column(name) for name, _ in unnested]).render_derived(name="u")
    values = {c: bindparam(c, type_=table.c[c].type) for c in scalars}
    if chunks is not None:
        values["job_id"] = chunks.c.job_id
    per_row = [Grouping(cast(bindparam(c), postgresql.ARRAY(REAL)))[rows.c[c + "__first"]:rows.c[c + "__last"]]
               if c in flattened else rows.c[c] for c in own]
    source = select(*values.values(), *per_row)
    if chunks is not None:
        source = source.select_from(chunks).where(chunks.c.id == values["chunk_id"])
    stmt = postgresql.insert(table).from_select([*scalars, *own], source) \
        .on_conflict_do_nothing(index_elements=list(unique))
    compiled = _binary_arrays_compiler(dialect)(dialect, stmt, arrays=frozenset(own) | {name for name, _ in unnested})
    bound = set(columns) - ({"job_id"} if chunks is not None else set())
    slices = {c + end for c in flattened for end in ("__first", "__last")}
    if compiled.positional or set(compiled.binds) != bound | slices:
        raise RuntimeError(f"the compiled insert into {table.name} binds {sorted(compiled.binds)}, "
                           f"not the columns {columns}")
    # the element's processor for an array column: the driver adapts the list, each value as the column would
    processors = tuple(_element_processor(table.c[c].type, table.c[c].type.dialect_impl(dialect).bind_processor(dialect))
                       if c in own else table.c[c].type.dialect_impl(dialect).bind_processor(dialect)
                       for c in columns)
    return BulkInsert(sql=compiled.string, columns=tuple(c for c in columns if c in bound),
                      processors=tuple(p for c, p in zip(columns, processors) if c in bound), positional=False,
                      arrays=True, flattened=flattened)


def _flatten(lists: Iterable[Any]) -> tuple[Float4ArrayBinary, list[int | None], list[int | None]]:
    """One flat float4 array of the values of `lists` (checked and rounded as Float32List does), and each list's
    first and last 1-based positions in it (an empty list: last = first - 1; None: NULL, NULL)."""
    flat: list[float] = []
    first: list[int | None] = []
    last: list[int | None] = []
    for values in lists:
        if values is None:
            first.append(None)
            last.append(None)
            continue
        if isinstance(values, (bytes, bytearray, memoryview, str)):
            raise TypeError(f"Float32List takes a list of floats, not {type(values).__name__}")
        first.append(len(flat) + 1)
        flat.extend(values)
        last.append(len(flat))
    return Float4ArrayBinary(flat), first, last


def _element_processor(type_: Any, processor: Callable[[Any], Any] | None) -> Callable[[Any], Any] | None:
    """A number column's values as one Python type: psycopg dumps a list in binary only when its elements share a
    type ("cannot dump lists of mixed types"), and a Float column may be handed 1 and 0.5 in one write, which a Core
    insert or SQLite stores alike. NULLs stay NULL."""
    if processor is not None or isinstance(type_, Boolean):
        return processor
    if isinstance(type_, Float):
        return _as(float)
    if isinstance(type_, Integer):
        return _as(int)
    return None


def _as(kind: type) -> Callable[[Any], Any]:
    def convert(value: Any) -> Any:
        return value if value is None or type(value) is kind else kind(value)
    return convert


def _binary_arrays_compiler(dialect: Dialect) -> type:
    """The dialect's statement compiler, placing the array parameters `arrays` as %(name)b: psycopg then sends them
    in binary (no text array literal to build and quote element by element: about 0.8 ms of a 64-row write's CPU in
    a profile, for the same stored values); every other parameter stays %(name)s."""
    base = dialect.statement_compiler

    class Compiler(base):  # type: ignore[misc, valid-type]
        def __init__(self, dialect: Dialect, statement: Any, *, arrays: frozenset[str]) -> None:
            self.binary_arrays = arrays
            super().__init__(dialect, statement)

        def bindparam_string(self, name: str, **kw: Any) -> str:
            placeholder = super().bindparam_string(name, **kw)
            if name in self.binary_arrays and placeholder == "%(" + name + ")s":
                return placeholder[:-1] + "b"
            return placeholder

    return Compiler
