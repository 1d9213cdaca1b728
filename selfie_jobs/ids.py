"""Numeric ids as text (a CLI argument, a prompt set named by id): ASCII digits only, within the column's range.

Python's `int()` and `str.isdigit()` take any Unicode digit ('١٢٣' is 123, '²' is a digit `int()` refuses) and
any size; the database takes neither past its integer columns. One rule here, so that every place that reads an
id from text agrees with the API's path and query parameters (which accept ASCII digits only).
"""

from __future__ import annotations

import re

#: Largest value of an `Integer` id column (PostgreSQL's int4; SQLite takes more, the API bounds it alike).
INT_MAX = 2**31 - 1
#: Largest value of a `BigInteger` id column (int8).
BIG_MAX = 2**63 - 1

_ASCII_DIGITS = re.compile(r"[0-9]{1,19}")


def is_ascii_id(text: str) -> bool:
    """Whether `text` is written as an id: 1-19 ASCII digits (any other text is a name, never a number)."""
    return _ASCII_DIGITS.fullmatch(text) is not None


def parse_id(text: str, maximum: int = INT_MAX) -> int | None:
    """The id `text` spells, or None when it is not ASCII digits or is past `maximum` (no such row can exist)."""
    if not is_ascii_id(text):
        return None
    value = int(text)
    return value if value <= maximum else None
