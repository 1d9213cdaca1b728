"""CSV cells a spreadsheet will not run: the safe export is the default, the raw one is asked for.

Interpretations, tokens, prompts and detector labels are text from clients and from the model. A cell starting with
`=`, `+`, `-` or `@` (or a tab or carriage return, which some spreadsheets skip before reading one of those) is read
as a formula by Excel, LibreOffice and Google Sheets when the file is opened. The safe form prefixes such a cell
with `'`, which spreadsheets show as text (OWASP's advice for CSV injection); a cell that is a plain number (a
negative relevancy) is left as it is. Scripts that want the exact text ask for `csv=raw`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
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
