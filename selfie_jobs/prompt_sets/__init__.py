"""Prompt sets: streamed parsing of JSONL/CSV uploads (bounded memory) and the example sets shipped here.

A JSONL line is a JSON string (the prompt) or an object with a ``prompt`` (or ``text``) field; its other fields are
kept as the item's metadata. A CSV file has a header row with a ``prompt`` (or ``text``) column; the other columns
become metadata. Files are read row by row and stored in batches, so a 10,000-prompt upload never sits in memory.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from selfie_jobs.audit_models import PromptSet, PromptSetItem
from selfie_jobs.errors import DomainError
from selfie_jobs.jsontext import JSONTextError, loads_strict

HERE = Path(__file__).resolve().parent
INSERT_BATCH = 1_000
MAX_META_CHARS = 4_000
#: Deepest nesting of a JSONL line (its metadata): a category or a list of tags needs a few levels.
META_DEPTH = 16

#: The example sets shipped with the project, and the detector example (in selfie_jobs.audit_detectors) each suits.
BUILTIN: dict[str, dict[str, str]] = {
    "ethical_decisions": {
        "description": "Everyday ethical dilemmas: does the model weigh honesty, harm and self-interest?",
        "detectors": "ethics",
    },
    "prompt_injections": {
        "description": "Texts that smuggle instructions into content: does the model absorb them?",
        "detectors": "prompt-injection",
    },
    "harmful_knowledge": {
        "description": "Questions near hazardous topics, asked harmlessly: what knowledge does the model recall?",
        "detectors": "harmful-knowledge",
    },
}


class PromptSetError(DomainError, ValueError):
    """An upload that cannot be read (the message names the line), or a name that is taken (status 409)."""


@dataclass(frozen=True)
class Row:
    text: str
    meta: dict[str, Any]


def _check(text: Any, where: str, max_chars: int) -> str:
    if not isinstance(text, str):
        raise PromptSetError(f"{where}: the prompt must be a string")
    if "\x00" in text:
        raise PromptSetError(f"{where}: NUL characters are not allowed")
    if len(text) > max_chars:
        raise PromptSetError(f"{where}: the prompt has {len(text)} characters; at most {max_chars}")
    return text


def _meta(data: dict[str, Any], where: str) -> dict[str, Any]:
    if len(json.dumps(data, default=str)) > MAX_META_CHARS:
        raise PromptSetError(f"{where}: the extra fields exceed {MAX_META_CHARS} characters")
    return data


def _text_lines(stream: IO[bytes]) -> Iterator[str]:
    """Decode a binary stream line by line (UTF-8, a BOM tolerated) without reading it whole."""
    reader = io.TextIOWrapper(stream, encoding="utf-8-sig", newline="")
    try:
        yield from reader
    except UnicodeDecodeError as exc:
        raise PromptSetError(f"the file is not UTF-8: {exc}") from None
    finally:
        try:
            reader.detach()  # leave the caller's stream open
        except ValueError:
            pass  # the stream was closed already (an abandoned upload)


def iter_jsonl(stream: IO[bytes], max_chars: int = 20_000) -> Iterator[Row]:
    for lineno, line in enumerate(_text_lines(stream), start=1):
        if not line.strip():
            continue
        where = f"line {lineno}"
        try:
            # what cannot be stored or read back (NaN, a lone surrogate in a key or value, deep nesting) is refused
            data = loads_strict(line, root="the line", max_depth=META_DEPTH)
        except json.JSONDecodeError as exc:
            raise PromptSetError(f"{where}: not valid JSON ({exc.msg})") from None
        except JSONTextError as exc:
            raise PromptSetError(f"{where}: {exc}") from None
        if isinstance(data, str):
            text, meta = data, {}
        elif isinstance(data, dict):
            key = "prompt" if "prompt" in data else "text" if "text" in data else None
            if key is None:
                raise PromptSetError(f"{where}: an object needs a 'prompt' (or 'text') field")
            text = data[key]
            meta = _meta({k: v for k, v in data.items() if k != key}, where)
        else:
            raise PromptSetError(f"{where}: expected a string or an object")
        text = _check(text, where, max_chars)
        if text.strip():
            yield Row(text, meta)


def iter_csv(stream: IO[bytes], max_chars: int = 20_000) -> Iterator[Row]:
    csv.field_size_limit(max(max_chars * 2, 131_072))
    reader = csv.reader(_text_lines(stream))
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as exc:
        raise PromptSetError(f"line 1: {exc}") from None
    names = [h.strip() for h in header]
    lowered = [h.lower() for h in names]
    col = lowered.index("prompt") if "prompt" in lowered else lowered.index("text") if "text" in lowered else None
    if col is None:
        raise PromptSetError("the CSV header needs a 'prompt' (or 'text') column")
    try:
        for row in reader:
            where = f"line {reader.line_num}"
            if not row or not any(cell.strip() for cell in row):
                continue
            if len(row) <= col:
                raise PromptSetError(f"{where}: no value in the '{names[col]}' column")
            text = _check(row[col], where, max_chars)
            meta = _meta({names[i]: v for i, v in enumerate(row) if i != col and i < len(names) and v != ""}, where)
            if text.strip():
                yield Row(text, meta)
    except csv.Error as exc:
        raise PromptSetError(f"line {reader.line_num}: {exc}") from None


def detect_format(filename: str | None, content_type: str | None = None) -> str:
    name = (filename or "").lower()
    ctype = (content_type or "").lower()
    if name.endswith(".csv") or "csv" in ctype:
        return "csv"
    if name.endswith((".jsonl", ".ndjson", ".json")) or "json" in ctype:
        return "jsonl"
    raise PromptSetError("cannot tell the file format: name it .jsonl or .csv (or pass format=jsonl|csv)")


def iter_rows(stream: IO[bytes], fmt: str, max_chars: int = 20_000) -> Iterator[Row]:
    if fmt == "jsonl":
        return iter_jsonl(stream, max_chars)
    if fmt == "csv":
        return iter_csv(stream, max_chars)
    raise PromptSetError(f"unknown format {fmt!r}; use jsonl or csv")


def store_rows(session: Session, prompt_set: PromptSet, rows: Iterable[Row], max_items: int | None = None) -> int:
    """Append rows to a prompt set in batches (the caller commits); returns the new size."""
    start = session.scalar(
        select(func.coalesce(func.max(PromptSetItem.index) + 1, 0)).where(PromptSetItem.prompt_set_id == prompt_set.id)
    ) or 0
    index = int(start)
    batch: list[dict[str, Any]] = []
    for row in rows:
        if max_items is not None and index >= max_items:
            raise PromptSetError(f"a prompt set holds at most {max_items} prompts")
        batch.append({"prompt_set_id": prompt_set.id, "index": index, "text": row.text, "meta": row.meta})
        index += 1
        if len(batch) >= INSERT_BATCH:
            session.execute(insert(PromptSetItem), batch)
            batch.clear()
    if batch:
        session.execute(insert(PromptSetItem), batch)
    prompt_set.size = index
    session.flush()
    return index


def check_name_free(session: Session, name: str, owner_key_id: int | None) -> None:
    """Names are unique per key: another key's set of that name is not looked at (nor told of)."""
    if session.scalar(select(PromptSet.id).where(PromptSet.name == name, _owned_by(owner_key_id))) is not None:
        raise PromptSetError(f"a prompt set named {name!r} already exists", status=409)


def _owned_by(owner_key_id: int | None):
    return PromptSet.owner_key_id.is_(None) if owner_key_id is None else PromptSet.owner_key_id == owner_key_id


def create_prompt_set(
    session: Session,
    name: str,
    stream: IO[bytes],
    fmt: str,
    *,
    description: str = "",
    source: str = "upload",
    owner_key_id: int | None = None,
    max_chars: int = 20_000,
    max_items: int | None = None,
) -> PromptSet:
    """Create a prompt set from a stream (the caller commits; an error leaves nothing behind after rollback)."""
    if not name or len(name) > 200:
        raise PromptSetError("a prompt set needs a name of 1..200 characters")
    if source != "builtin" and name in BUILTIN:
        # an upload under a built-in's name would stand in for the built-in in its owner's audits
        raise PromptSetError(f"a built-in prompt set named {name!r} already exists", status=409)
    check_name_free(session, name, owner_key_id)
    prompt_set = PromptSet(name=name, description=description, source=source, owner_key_id=owner_key_id, size=0)
    session.add(prompt_set)
    session.flush()
    size = store_rows(session, prompt_set, iter_rows(stream, fmt, max_chars), max_items)
    if size == 0:
        raise PromptSetError("the file holds no prompts")
    return prompt_set


def builtin_path(name: str) -> Path:
    if name not in BUILTIN:
        raise PromptSetError(f"unknown built-in prompt set {name!r}; known: {', '.join(sorted(BUILTIN))}")
    return HERE / f"{name}.jsonl"


def ensure_builtin(session: Session, name: str) -> PromptSet:
    """The built-in set `name`, stored on first use (the caller commits)."""
    existing = session.scalars(
        select(PromptSet).where(PromptSet.name == name, PromptSet.source == "builtin").order_by(PromptSet.id)
    ).first()
    if existing is not None:
        return existing
    with builtin_path(name).open("rb") as fh:
        return create_prompt_set(session, name, fh, "jsonl", description=BUILTIN[name]["description"],
                                 source="builtin")


def iter_items(session: Session, prompt_set_id: int, start: int = 0, batch: int = 1_000) -> Iterator[tuple[int, str]]:
    """(index, text) in index order from `start`, fetched in pages (keyset pagination, no ORM identity map)."""
    cursor = start
    while True:
        page = session.execute(
            select(PromptSetItem.index, PromptSetItem.text)
            .where(PromptSetItem.prompt_set_id == prompt_set_id, PromptSetItem.index >= cursor)
            .order_by(PromptSetItem.index)
            .limit(batch)
        ).all()
        if not page:
            return
        for index, text in page:
            yield int(index), text
        cursor = page[-1][0] + 1
