"""JSON this service accepts from clients: standard JSON, whose every string can be stored and sent back.

Python's `json` accepts `NaN`, `Infinity` and `-Infinity` (and reads `1e999` as infinity), and decodes `"\\ud800"`
to a lone UTF-16 surrogate, which no database, tokenizer or JSON encoder takes; it also nests as deep as the
interpreter's stack allows, and raises a plain ValueError for an integer of more digits than `int()` converts
(`sys.get_int_max_str_digits()`, 4300 by default). `loads_strict` refuses all of these with a `JSONTextError`
saying where, so that the API (request bodies) and uploads (JSONL lines) refuse them before anything is stored.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

#: Deepest nesting a request body or an uploaded line may have (real ones use a handful of levels).
MAX_DEPTH = 64


class JSONTextError(ValueError):
    """JSON that parses in Python but is not what this service stores; the message says where."""


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JSONTextError(f"the number {text} is out of range (not finite)")
    return value


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:  # past the interpreter's digit limit (a guard against quadratic-time conversion)
        raise JSONTextError(f"an integer of {len(text.lstrip('-'))} digits is out of range (at most "
                            f"{sys.get_int_max_str_digits()} digits are read)") from None


def _constant(name: str) -> Any:
    raise JSONTextError(f"{name} is not a JSON number; send a finite number")


def encodable(text: str) -> bool:
    """Whether `text` has no lone surrogate (UTF-8 can carry it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_value(value: Any, root: str = "body", max_depth: int = MAX_DEPTH) -> None:
    """Raise JSONTextError at the first string (key or value) with a lone surrogate, or nesting past `max_depth`.
    Walked with a stack, not recursion."""
    stack: list[tuple[str, Any, int]] = [(root, value, 0)]
    while stack:
        path, item, depth = stack.pop()
        if isinstance(item, str):
            if not encodable(item):
                raise JSONTextError(f"{path} holds a lone UTF-16 surrogate (\\ud800-\\udfff); send valid Unicode")
            continue
        if not isinstance(item, (dict, list)):
            continue
        if depth >= max_depth:
            raise JSONTextError(f"{path} is nested deeper than {max_depth} levels")
        if isinstance(item, dict):
            for key, sub in item.items():
                if not encodable(key):
                    raise JSONTextError(f"a key in {path} holds a lone UTF-16 surrogate (\\ud800-\\udfff); "
                                        "send valid Unicode")
                stack.append((f"{path}.{key}", sub, depth + 1))
        else:
            stack.extend((f"{path}[{i}]", sub, depth + 1) for i, sub in enumerate(item))


def loads_strict(doc: str, root: str = "body", max_depth: int = MAX_DEPTH) -> Any:
    """`json.loads` refusing non-finite numbers, integers past the digit limit, lone surrogates and deep nesting
    (JSONTextError); a syntax error is json.JSONDecodeError as usual."""
    try:
        value = json.loads(doc, parse_constant=_constant, parse_float=_finite, parse_int=_integer)
    except RecursionError:
        raise JSONTextError(f"{root} is nested deeper than {max_depth} levels") from None
    check_value(value, root, max_depth)
    return value
