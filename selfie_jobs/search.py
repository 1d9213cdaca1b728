"""Search across results: the interpretations and vector interpretations a key may read, by word or phrase, with
filters and pages, on the full-text index of the database in use (made by migration 0010_lenses_search):
PostgreSQL matches the stored column `search_vector = to_tsvector('simple', text)` (GIN index) against
`phraseto_tsquery`; SQLite
matches the FTS5 table `<table>_fts` (external content, kept in sync by triggers).

User text never reaches the database as query syntax: `parse_query` keeps only words (runs of letters and digits),
grouped into the phrases the user quoted; each phrase is bound as a parameter (PostgreSQL) or written as an FTS5
string of word characters only (SQLite), and every phrase must match (AND).

Paging: each source is read newest id first; a page merges the sources by time and its cursor holds the last id
taken from each, so every page is one ORDER BY id DESC LIMIT read per source.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import column, false, func, literal_column, select
from sqlalchemy import table as sql_table
from sqlalchemy.orm import Session

from selfie_jobs.auth import Principal
from selfie_jobs.chunks import as_utc
from selfie_jobs.models import Interpretation, Job, VectorInterpretation
from selfie_jobs.queries import QueryError, decode_cursor, encode_cursor

MAX_QUERY_CHARS = 200
MAX_TERMS = 16
_SEGMENT = re.compile(r'"([^"]*)"|([^\s"]+)')
_WORD = re.compile(r"[^\W_]+")

#: source name (the job kind whose results it holds) -> result table
SOURCES: dict[str, type] = {"interpret": Interpretation, "vectors": VectorInterpretation}
SEARCHED_TABLES = tuple(t.__tablename__ for t in SOURCES.values())
#: PostgreSQL only: the stored tsvector column of each searched table
SEARCH_COLUMN = "search_vector"


def is_search_object(name: str | None) -> bool:
    """The full-text objects the migration makes and the models cannot declare (FTS5 tables and their shadow
    tables; on PostgreSQL the search_vector columns and their indexes): schema comparisons leave them out."""
    if not name:
        return False
    return name == SEARCH_COLUMN or any(name.startswith(f"{t}_fts") or name == f"ix_{t}_text_search"
                                        for t in SEARCHED_TABLES)


def parse_query(q: str) -> list[str]:
    """The phrases of a query (each one or more words, space-separated); `QueryError` for a query that is too
    long or has no word at all (only operators or punctuation)."""
    if len(q) > MAX_QUERY_CHARS:
        raise QueryError(f"the query has {len(q)} characters; at most {MAX_QUERY_CHARS}", field="q")
    phrases = []
    for quoted, bare in _SEGMENT.findall(q):
        words = _WORD.findall(quoted if quoted else bare)
        if words:
            phrases.append(" ".join(w.lower() for w in words))
    if not phrases:
        raise QueryError("the query has no words to search for (letters or digits)", field="q")
    if len(phrases) > MAX_TERMS:
        raise QueryError(f"the query has {len(phrases)} words or phrases; at most {MAX_TERMS}", field="q")
    return list(dict.fromkeys(phrases))


@dataclass
class SearchFilter:
    model: str | None = None
    job_id: str | None = None
    audit_run: int | None = None
    kinds: tuple[str, ...] = tuple(SOURCES)
    layer_min: int | None = None
    layer_max: int | None = None
    since: datetime | None = None
    until: datetime | None = None
    grounded: bool | None = None  # interpretations judged (not) grounded; rows stored before judging match neither


@dataclass
class SearchPage:
    rows: list[dict[str, Any]] = field(default_factory=list)
    next_cursor: str | None = None


def _source_query(session: Session, kind: str, who: Principal, phrases: list[str], flt: SearchFilter,
                  after: int | None, limit: int):
    table = SOURCES[kind]
    if session.get_bind().dialect.name == "postgresql":
        # the stored column search_vector = to_tsvector('simple', text) and its GIN index (0010_lenses_search);
        # not in the models (only PostgreSQL has it), and no other table of the query has a column of that name
        vector = literal_column("search_vector")
        tsquery = None
        for phrase in phrases:
            part = func.phraseto_tsquery(literal_column("'simple'::regconfig"), phrase)
            tsquery = part if tsquery is None else tsquery.op("&&")(part)
        query = select(table, Job.audit_run_id).where(vector.op("@@")(tsquery))
        position = table.id
    else:
        # Read from the FTS5 table, newest rowid first: FTS5 walks its matches in rowid order and the page stops
        # the walk, so a word in most rows costs a page, not a sort of every match. FTS5 syntax: each phrase a
        # string of word characters and spaces (parse_query), never a user's operator.
        name = f"{table.__tablename__}_fts"
        fts = sql_table(name, column("rowid"), column("text"))
        expression = " ".join(f'"{phrase}"' for phrase in phrases)
        # `<fts>.text MATCH :expression`: the FTS table's one column, the expression a bound parameter
        query = (select(table, Job.audit_run_id).select_from(fts).join(table, table.id == fts.c.rowid)
                 .where(fts.c.text.op("MATCH")(expression)))
        position = fts.c.rowid
    query = query.join(Job, Job.id == table.job_id)
    if not who.is_admin:
        query = query.where(Job.owner_key_id == who.key_id) if who.key_id is not None else query.where(false())
    if flt.model is not None:
        query = query.where(table.model == flt.model)
    if flt.job_id is not None:
        query = query.where(table.job_id == flt.job_id)
    if flt.audit_run is not None:
        query = query.where(Job.audit_run_id == flt.audit_run)
    if flt.since is not None:
        query = query.where(table.created_at >= flt.since)
    if flt.until is not None:
        query = query.where(table.created_at < flt.until)
    if kind == "interpret":
        if flt.layer_min is not None:
            query = query.where(table.layer >= flt.layer_min)
        if flt.layer_max is not None:
            query = query.where(table.layer <= flt.layer_max)
        if flt.grounded is not None:
            query = query.where(table.grounded.is_(flt.grounded))
    if after is not None:
        query = query.where(position < after)
    return query.order_by(position.desc()).limit(limit)


def _row(kind: str, row: Any, audit_run: int | None) -> dict[str, Any]:
    # in UTC with its zone (SQLite gives naive times): a page in another zone must not read them as local
    out = {"kind": kind, "id": row.id, "job_id": row.job_id, "model": row.model, "created_at": as_utc(row.created_at),
           "text": row.text, "mean_relevancy": row.mean_relevancy, "audit_run": audit_run,
           "prompt_index": None, "layer": None, "token": None, "source_token": None, "vector_index": None,
           "label": None, "grounded": None}
    if kind == "interpret":
        out.update(prompt_index=row.prompt_index, layer=row.layer, token=row.token, source_token=row.source_token,
                   grounded=row.grounded)
    else:
        out.update(vector_index=row.vector_index, label=row.label)
    return out


def _merge_newest_first(read: dict[str, list[dict[str, Any]]], limit: int) -> list[tuple[str, dict[str, Any]]]:
    """Up to `limit` rows of the sources, newest first, each source's rows kept in the order read (id descending):
    the cursor keeps the lowest id taken from each source, so what is taken of a source must be a prefix of what
    was read of it. (Sorting all rows by time instead skipped a row for good where a source's times disagree with
    its ids: rows of two workers, or of hosts whose clocks differ.)"""
    heads = {kind: 0 for kind in read}
    taken: list[tuple[str, dict[str, Any]]] = []
    while len(taken) < limit:
        ready = [kind for kind, i in heads.items() if i < len(read[kind])]
        if not ready:
            break
        kind = max(ready, key=lambda k: (read[k][heads[k]]["created_at"], read[k][heads[k]]["id"], k))
        taken.append((kind, read[kind][heads[kind]]))
        heads[kind] += 1
    return taken


def search(session: Session, who: Principal, q: str, flt: SearchFilter | None = None, *, limit: int = 50,
           cursor: str | None = None) -> SearchPage:
    """Newest first across the sources in `flt.kinds` (a layer or grounded filter leaves out the sources without
    layers or judgements: vector interpretations)."""
    flt = flt or SearchFilter()
    phrases = parse_query(q)
    kinds = [k for k in SOURCES if k in flt.kinds]
    if flt.layer_min is not None or flt.layer_max is not None or flt.grounded is not None:
        kinds = [k for k in kinds if k == "interpret"]
    # per source: -1 = not read yet, an id = read down to (not including) it, 0 = nothing more
    after: dict[str, int] = {k: -1 for k in SOURCES}
    if cursor:
        values = decode_cursor(cursor, "search", len(SOURCES))
        if not all(isinstance(v, int) and v >= -1 for v in values):
            raise QueryError("malformed cursor")
        after = dict(zip(SOURCES, values))
    read: dict[str, list[dict[str, Any]]] = {}
    more: dict[str, bool] = {}
    for kind in kinds:
        if after[kind] == 0:
            continue
        start = None if after[kind] == -1 else after[kind]
        got = session.execute(_source_query(session, kind, who, phrases, flt, start, limit + 1)).all()
        more[kind] = len(got) > limit
        read[kind] = [_row(kind, row, audit_run) for row, audit_run in got[:limit]]
    taken = _merge_newest_first(read, limit)
    candidates = [(kind, row) for kind, rows in read.items() for row in rows]
    for kind in SOURCES:
        if kind not in kinds or after[kind] == 0:
            after[kind] = 0
            continue
        ids = [row["id"] for k, row in taken if k == kind]
        if ids:
            after[kind] = min(ids)
        if len(ids) == sum(1 for k, _ in candidates if k == kind) and not more[kind]:
            after[kind] = 0  # every match of this source is on this page or an earlier one
    done = all(v == 0 for v in after.values())
    next_cursor = None if done else encode_cursor("search", [after[k] for k in SOURCES])
    return SearchPage([row for _, row in taken], next_cursor)
