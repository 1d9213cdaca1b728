"""A job's CSV written by PostgreSQL itself: COPY (SELECT <one text cell per column>) TO STDOUT (FORMAT csv).

Written in Python (selfie_jobs.csv_cells), a whole job's CSV ran at about 23,000 rows/s with the API process's
core full: a third of it writing each row's relevancy floats, a quarter the csv module, a fifth fetching the rows
(benchmarks/README.md "Reads at scale"). Here the server formats every cell and the API passes its rows on.

Each cell is the text the Python export writes for the same row, byte for byte (tests/unit/jobs/test_csv_copy.py
compares both on values chosen to differ):
- whole numbers as PostgreSQL writes them (the same digits as Python's str);
- floats (float8): PostgreSQL's shortest round-trip digits are the digits of Python's repr; the spelling differs
  in three places, fixed here: a whole number gets ".0" (PostgreSQL "1", Python "1.0"), a number from 1e15 up to
  1e16 is written out (PostgreSQL switches to an exponent at 1e15, Python at 1e16), and NaN and the infinities are
  nan, inf and -inf as csv.writer writes them. Rows where none of this can occur (each number holds a "." and no
  "e+") take the fast path, the number as PostgreSQL writes it;
- a relevancy list (float32 values, `real[]`) as json.dumps writes the list of doubles they are: "[" + the numbers,
  read as float8 and spelled as above, joined by ", " + "]"; stored lists hold finite values only;
- booleans as true/false, times as datetime.isoformat (a "T", microseconds only when not zero, the offset as
  +HH:MM), JSON columns as their stored text, NULL as an empty cell;
- text as it is, or with the "safe" export's ' before a cell a spreadsheet would run (csv_cells.safe_cell's rule);
  an empty text is an empty cell (PostgreSQL would quote it to tell it from NULL; Python's csv does not).
PostgreSQL quotes a cell holding a comma, a quote, CR or LF and doubles its quotes, as csv.writer does; it ends
each row with LF, which becomes csv.writer's CRLF here (each row arrives as one message of the COPY).

The session's `extra_float_digits` is set to 1 for the export's transaction: any value above 0 gives the shortest
round-trip digits, and a session set lower would round the numbers; `client_encoding` is set to UTF-8, which the
response declares.

Where the two exports can still differ (never for what the service stores; tests/unit/jobs/test_csv_copy.py):
- a whole number of 2^53 or more (about 9e15; never a relevancy, which lies in [-1, 1]) may be written with 17
  digits where Python writes fewer: PostgreSQL prints such an integer exactly rather than shortest; it reads back
  as the same double;
- times: both write the session's time zone, but a zone psycopg cannot name (a POSIX spelling such as 'UTC+3')
  makes the Python export fall back to UTC, and offsets with seconds (local mean time before 1900) lose them here.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Float, Integer, String, case, cast, func, literal, select, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.types import Text

from selfie_jobs.csv_cells import FORMULA_START, CsvMode
from selfie_jobs.float_arrays import Float32List

#: Rows passed on to the response at a time.
ROWS_PER_PIECE = 1000
_FLOAT8 = postgresql.DOUBLE_PRECISION()
# csv_cells._NUMBER, anchored. No backslash in these patterns: a session with standard_conforming_strings off
# would read one in a string literal as an escape.
_NUMBER_PATTERN = "^-?[0-9]+([.][0-9]+)?([eE][-+]?[0-9]+)?$"


def copy_csv_rows(session: Session, query: Any) -> Iterator[bytes]:
    """The rows of `query` (a SELECT of `text_cells`) as CSV lines ending in CRLF, ROWS_PER_PIECE lines a piece,
    streamed from a COPY on the session's connection (PostgreSQL only)."""
    compiled = query.compile(dialect=session.get_bind().dialect, compile_kwargs={"render_postcompile": True})
    # every digit (module docstring), and UTF-8 whatever the database's encoding: the bytes go out as they come
    session.execute(text("SET LOCAL extra_float_digits = 1"))
    session.execute(text("SET LOCAL client_encoding = 'UTF8'"))
    driver = session.connection().connection.driver_connection
    with driver.cursor() as cursor, cursor.copy(f"COPY ({compiled.string}) TO STDOUT (FORMAT csv)",
                                                compiled.params) as copy:
        lines: list[Any] = []
        for row in copy:  # one row a message, ending in LF
            lines.append(row[:-1])
            if len(lines) == ROWS_PER_PIECE:
                yield b"\r\n".join(lines) + b"\r\n"
                lines.clear()
        if lines:
            yield b"\r\n".join(lines) + b"\r\n"


def _s(value: str) -> ColumnElement[Any]:
    """A constant of these cells, written into the statement by SQLAlchemy (literal_execute, rendered when the COPY is
    compiled): a COPY takes no server-side parameters, and the export's own constants need no client-side ones."""
    return literal(value, Text, literal_execute=True)


def _i(value: int) -> ColumnElement[Any]:
    return literal(value, Integer, literal_execute=True)


def text_cells(table: Any, names: Sequence[str], mode: CsvMode) -> list[ColumnElement[Any]]:
    """One text cell per column `names` of `table`, as the Python export writes it (module docstring)."""
    return [_cell(getattr(table, name), mode).label(name) for name in names]


def _cell(column: Any, mode: CsvMode) -> ColumnElement[Any]:
    kind = column.type
    if isinstance(kind, Float32List):
        return _float_list(column)
    if isinstance(kind, Boolean):
        return case((column.is_(True), _s("true")), (column.is_(False), _s("false")))
    if isinstance(kind, Integer):
        return column
    if isinstance(kind, Float):
        return _float(column)
    if isinstance(kind, DateTime):
        return _iso_time(column)
    if isinstance(kind, JSON):
        return _text(cast(column, Text), mode)
    if isinstance(kind, String):
        return _text(column, mode)
    raise TypeError(f"no CSV cell for column {column.key} of type {kind!r}")


def _text(value: Any, mode: CsvMode) -> ColumnElement[Any]:
    if mode == "safe":
        risky = func.left(value, _i(1)).in_([_s(c) for c in FORMULA_START]) \
            & ~value.regexp_match(_s(_NUMBER_PATTERN))
        value = case((risky, _s("'") + value), else_=value)
    return func.nullif(value, _s(""))


def _float(column: Any) -> ColumnElement[Any]:
    written = cast(column, Text)
    plain = (func.strpos(written, _s(".")) > _i(0)) & (func.strpos(written, _s("e+")) == _i(0))
    return case((plain, written), else_=_python_float(column, csv_repr=True))


def _float_list(column: Any) -> ColumnElement[Any]:
    doubles = cast(column, postgresql.ARRAY(_FLOAT8))
    joined = func.array_to_string(doubles, _s(", "))
    dots = func.length(joined) - func.length(func.replace(joined, _s("."), _s("")))
    plain = (dots == func.cardinality(column)) & (func.strpos(joined, _s("e+")) == _i(0))
    element = func.unnest(doubles).table_valued("x", with_ordinality="o").render_derived(name="e")
    each = func.string_agg(_python_float(element.c.x, csv_repr=False),
                           postgresql.aggregate_order_by(_s(", "), element.c.o))
    spelled = select(_s("[") + func.coalesce(each, _s("")) + _s("]")).select_from(element).scalar_subquery()
    return case((column.is_(None), None), (plain, _s("[") + joined + _s("]")), else_=spelled)


def _python_float(value: Any, *, csv_repr: bool) -> ColumnElement[Any]:
    """A float8 spelled as Python's repr (`csv_repr`: with csv.writer's nan, inf, -inf; otherwise a finite one, as
    json.dumps writes it)."""
    written = cast(value, Text)
    digits = func.replace(func.replace(func.regexp_replace(written, _s("e[+]15$"), _s("")), _s("-"), _s("")),
                          _s("."), _s(""))
    sign = case((func.left(written, _i(1)) == _s("-"), _s("-")), else_=_s(""))
    written_out = case((func.length(digits) <= _i(16), sign + func.rpad(digits, _i(16), _s("0")) + _s(".0")),
                       else_=sign + func.left(digits, _i(16)) + _s(".") + func.substr(digits, _i(17)))
    whens = [(written.regexp_match(_s("^-?[0-9]+$")), written + _s(".0")),
             (written.regexp_match(_s("e[+]15$")), written_out)]
    if csv_repr:
        whens += [(written == _s(name), _s(python)) for name, python in
                  (("NaN", "nan"), ("Infinity", "inf"), ("-Infinity", "-inf"))]
    return case(*whens, else_=written)


def _iso_time(column: Any) -> ColumnElement[Any]:
    micro = func.to_char(column, _s(".US"))
    return (func.to_char(column, _s('YYYY-MM-DD"T"HH24:MI:SS')) + case((micro == _s(".000000"), _s("")), else_=micro)
            + func.to_char(column, _s("TZH:TZM")))
