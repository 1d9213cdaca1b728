"""CSV cells a spreadsheet will not run: the safe export is the default, the raw one is asked for.

Interpretations, tokens, prompts and detector labels are text from clients and from the model. A cell starting with
`=`, `+`, `-` or `@` (or a tab or carriage return, which some spreadsheets skip before reading one of those) is read
as a formula by Excel, LibreOffice and Google Sheets when the file is opened. The safe form prefixes such a cell
with `'`, which spreadsheets show as text (OWASP's advice for CSV injection); a cell that is a plain number (a
negative relevancy) is left as it is. Scripts that want the exact text ask for `csv=raw`.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from typing import Any, Literal

CsvMode = Literal["safe", "raw"]
CSV_MODE_DOC = ("CSV only: 'safe' (the default) prefixes with ' every cell a spreadsheet would run as a formula "
                "(starting with =, +, -, @, tab or CR); 'raw' gives the text exactly as stored, for scripts.")
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?")


def safe_cell(value: Any) -> Any:
    if isinstance(value, str) and value.startswith(FORMULA_START) and not _NUMBER.fullmatch(value):
        return "'" + value
    return value


def csv_row(values: Iterable[Any], mode: CsvMode) -> list[Any]:
    """One row for `csv.writer`, made safe unless `mode` is "raw"."""
    return list(values) if mode == "raw" else [safe_cell(v) for v in values]


def export_cell(value: Any) -> Any:
    """A stored value as its CSV cell: text and numbers as they are, booleans as true/false, times in ISO 8601,
    lists and dicts as JSON, nothing as an empty cell."""
    kind = type(value)
    if kind is str or kind is int or kind is float:  # nearly every cell: the cheapest test first
        return value
    if value is None:
        return ""
    if kind is bool:  # as JSON spells them (the grounded column), not Python's True/False
        return "true" if value else "false"
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return value


def _safe_export_cell(value: Any) -> Any:
    return safe_cell(value) if type(value) is str else export_cell(value)


_AS_IS = frozenset((str, int, float))
_RISKY_FIRST = frozenset(FORMULA_START)


def _raw_cells(row: Sequence[Any]) -> list[Any]:
    return [v if type(v) in _AS_IS else export_cell(v) for v in row]


def _safe_cells(row: Sequence[Any]) -> list[Any]:
    # Inline for the common cells (numbers, text not starting like a formula): an export calls this per row.
    return [v if type(v) in _AS_IS and (type(v) is not str or v[:1] not in _RISKY_FIRST) else _safe_export_cell(v)
            for v in row]


def csv_text(header: Sequence[str], rows: Iterable[Sequence[Any]], mode: CsvMode,
             rows_per_piece: int = 1000) -> Iterator[str]:
    """A CSV file in pieces of `rows_per_piece` rows (the header first), for a streamed response: memory holds one
    piece whatever the number of rows."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    cells = _raw_cells if mode == "raw" else _safe_cells
    piece: list[list[Any]] = []
    for row in rows:
        piece.append(cells(row))
        if len(piece) == rows_per_piece:
            writer.writerows(piece)
            piece.clear()
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    writer.writerows(piece)
    yield buffer.getvalue()
