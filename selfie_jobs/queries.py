"""Read-side queries for the api: job status, job lists, interpretation pages, cancel, live models.

Every query that touches jobs takes the asking `Principal`: a job is visible only to the key that created it (an
admin key sees all). An invisible job reads exactly like a missing one. Pages use keyset cursors (stable under
concurrent inserts, O(page) at any depth), opaque to clients.

The text filter `q` keeps one meaning on both databases (text contains q, any case, q's % _ / plain characters)
and has two spellings on PostgreSQL: with a trigram to look up, the one the job's trigram index serves (migration
0014); without one, a spelling that index cannot serve, so the job's rows are read through its b-tree. A read with
`q` is planned for its own word on PostgreSQL, never with a plan made for any word (`plan_for_the_word`).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import JSON, Text, and_, cast, false, func, or_, select, text, tuple_, update
from sqlalchemy.orm import Session

from selfie_jobs.auth import Principal
from selfie_jobs.cards import served_models, wait_reason
from selfie_jobs.chunks import as_utc, lock_job
from selfie_jobs.csv_cells import CsvMode, csv_text
from selfie_jobs.csv_copy import copy_csv_rows, text_cells
from selfie_jobs.errors import BadQuery
from selfie_jobs.jsontext import loads_strict
from selfie_jobs.kinds import get_kind
from selfie_jobs.liveness import live_workers
from selfie_jobs.models import Chunk, Interpretation, Job, Prompt, utcnow
from selfie_jobs.states import FINAL_JOB_STATES, ChunkState, JobState
from selfie_jobs.writes import count_stored_rows


class QueryError(BadQuery, ValueError):
    """A malformed filter or cursor."""


# --- cursors ----------------------------------------------------------------------------------------------------


def encode_cursor(kind: str, values: Sequence[Any]) -> str:
    raw = json.dumps([kind, list(values)], separators=(",", ":"), default=str).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, kind: str, shape: int | Sequence[type]) -> list[Any]:
    """The values of a cursor made by `encode_cursor(kind, ...)`; QueryError for anything else.

    `shape`: how many values, or each value's type (int, float, str or datetime, the last sent as ISO text and
    given back parsed). A cursor is opaque to clients but comes back from them: one edited into values of the wrong
    type would otherwise compare against the sort keys as nothing and read as the last page.
    """
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        # Strict: no NaN or infinities, no lone surrogates (which no database driver can send).
        got_kind, values = loads_strict(raw.decode("utf-8"), root="cursor")
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError):
        raise QueryError("malformed cursor") from None
    types = [None] * shape if isinstance(shape, int) else list(shape)
    if got_kind != kind or not isinstance(values, list) or len(values) != len(types):
        raise QueryError("the cursor belongs to another listing or sort order")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float, str)) or (isinstance(v, str) and "\x00" in v):
            raise QueryError("malformed cursor")
        if isinstance(v, int) and abs(v) > 2**62:
            raise QueryError("malformed cursor")
    return [v if expected is None else _typed(v, expected) for v, expected in zip(values, types)]


def _typed(value: Any, expected: type) -> Any:
    if expected is float and isinstance(value, (int, float)):
        return float(value)
    if expected is datetime and isinstance(value, str):
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            raise QueryError("malformed cursor") from None
    if type(value) is not expected:
        raise QueryError("malformed cursor")
    return value


def _after(keys: Sequence[tuple[Any, bool]], values: Sequence[Any]):
    """Rows strictly after `values` in the order given by `keys` ((column, descending) pairs).

    Written so that an index on (job_id, *keys) is entered at the cursor, not scanned from the job's first row:
    keys all in one direction compare as one row value ((a, b) > (x, y)), which PostgreSQL and SQLite both take
    as an index range; otherwise the first key bounds the range (a >= x) and the exact condition filters within
    that key's value."""
    columns = [column for column, _ in keys]
    directions = {desc for _, desc in keys}
    if len(directions) == 1:
        row = tuple_(*columns)
        return row < tuple(values) if directions == {True} else row > tuple(values)
    clauses = []
    for i, (column, desc) in enumerate(keys):
        prefix = [keys[j][0] == values[j] for j in range(i)]
        clauses.append(and_(*prefix, column < values[i] if desc else column > values[i]))
    first, first_desc = keys[0]
    return and_(first <= values[0] if first_desc else first >= values[0], or_(*clauses))


# --- jobs -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobProgress:
    """How far a job is, in interpretations (results of its kind), and how long the rest should take.

    `done`: results stored (finished interpretations). `in_flight`: the job's rows in engine batches decoding now on
    live workers (not yet in `done`); `decode_step` of `decode_steps` (max_new_tokens; rows that end early finish
    the batch sooner): how far the furthest such batch is. `rows_per_second`: the job's share of the measured rate
    of the workers running it (their results per second over their last engine batches, writes included; before a
    worker's first batch ends, estimated from its decode steps). `eta_seconds`: the rows not done and not yet
    decoded, (total - done - in_flight x step / steps), at that rate; None when nothing of the job runs now.
    """

    done: int
    total: int
    in_flight: int = 0
    decode_step: int | None = None
    decode_steps: int | None = None
    rows_per_second: float | None = None
    eta_seconds: float | None = None

    @property
    def fraction(self) -> float:
        return (self.done / self.total) if self.total else 1.0


def job_progress(session: Session, job: Job, *, running_chunks: int, alive_seconds: float | None,
                 now: datetime | None = None) -> JobProgress:
    """The job's progress: `done` is the rows stored (the job's count covers its completed chunks; the rows that its
    running chunks have stored so far, engine batch by engine batch, are counted here); rows in flight, rate and
    ETA from the `in_flight` report that each live worker running a chunk of the job publishes with its heartbeat
    (`workers.progress.BatchWatch.snapshot`)."""
    done, total = job.done, job.total
    if job.state in FINAL_JOB_STATES or not running_chunks:
        return JobProgress(done, total)
    done = min(total, done + _rows_of_running_chunks(session, job))
    if alive_seconds is None:
        return JobProgress(done, total)
    now = as_utc(now or utcnow())
    rows = 0
    decoded = 0.0
    rate = 0.0
    step = steps = None
    for worker in live_workers(session, alive_seconds, model=job.model):
        flight = (worker.info or {}).get("in_flight") or {}
        mine = int((flight.get("jobs") or {}).get(job.id) or 0)
        if not mine:
            continue
        batch_rows = max(mine, sum(int(n) for n in flight["jobs"].values()))
        w_step, w_steps = int(flight.get("step") or 0), int(flight.get("steps") or 0)
        share = (w_step / w_steps) if w_steps else 0.0
        rows += mine
        decoded += mine * share
        if w_steps and (step is None or share > (step / steps if steps else 0)):
            step, steps = w_step, w_steps
        measured = flight.get("rows_per_second")
        if measured is None and share > 0 and flight.get("batch_started_at"):
            # the first batch of this worker is still decoding: rows per second as its steps go
            elapsed = (now - as_utc(datetime.fromisoformat(flight["batch_started_at"]))).total_seconds()
            measured = batch_rows * share / elapsed if elapsed > 0 else None
        if measured:
            rate += float(measured) * mine / batch_rows
    left = max(0.0, total - done - decoded)
    eta = round(left / rate, 1) if rate > 0 else None
    return JobProgress(done, total, in_flight=rows, decode_step=step, decode_steps=steps,
                       rows_per_second=round(rate, 3) if rate > 0 else None, eta_seconds=eta)


def _rows_of_running_chunks(session: Session, job: Job) -> int:
    """Rows already stored by the job's running chunks: the writers do not touch the job's row per write (it would
    serialise them), only when a chunk completes. A read of at most a few chunks' rows, by the chunk_id index."""
    table = get_kind(job.kind).table
    running = select(Chunk.id).where(Chunk.job_id == job.id, Chunk.state == ChunkState.RUNNING)
    return session.scalar(select(func.count()).select_from(table).where(table.chunk_id.in_(running))) or 0


def closed_jobs(session: Session, job_ids: Collection[str]) -> set[str]:
    """Which of these jobs are closed (cancelled, failed, succeeded): a worker stops their rows in its batch."""
    if not job_ids:
        return set()
    return set(session.scalars(select(Job.id).where(Job.id.in_(list(job_ids)),
                                                    Job.state.in_(list(FINAL_JOB_STATES)))).all())


@dataclass
class JobView:
    job: Job
    chunks: dict[str, int]
    queue_position: int | None
    items_ahead: int | None
    prompts: list[Prompt] = field(default_factory=list)
    waiting: str | None = None  # why a job that is not final waits (its model loading, no worker), if it does
    first_claimed_at: datetime | None = None  # when a worker first took one of its chunks
    live: JobProgress | None = None

    @property
    def state(self) -> str:
        """`running` as soon as a worker runs any of its chunks, even before its first results are stored."""
        if self.job.state == JobState.QUEUED and self.chunks.get(ChunkState.RUNNING.value):
            return JobState.RUNNING.value
        return str(self.job.state)

    @property
    def started_at(self) -> datetime | None:
        """The first claim of one of its chunks (the job's own mark is set at its first stored results)."""
        marks = [m for m in (as_utc(self.first_claimed_at), as_utc(self.job.started_at)) if m is not None]
        return min(marks) if marks else None

    @property
    def progress(self) -> float:
        return (self.job.done / self.job.total) if self.job.total else 1.0

    def timings(self, now: datetime | None = None) -> dict[str, float | None]:
        now = now or utcnow()
        created, started, finished = (as_utc(self.job.created_at), self.started_at, as_utc(self.job.finished_at))
        waited_until = started or finished or now
        return {
            "queued_seconds": max(0.0, (waited_until - created).total_seconds()) if created else None,
            "running_seconds": max(0.0, ((finished or now) - started).total_seconds()) if started else None,
            "total_seconds": max(0.0, ((finished or now) - created).total_seconds()) if created else None,
        }


def visible_job(session: Session, job_id: str, who: Principal) -> Job | None:
    job = session.get(Job, job_id)
    if job is None or not who.can_see(job.owner_key_id):
        return None
    return job


def job_chunk_counts(session: Session, job_id: str) -> dict[str, int]:
    counts = {state.value: 0 for state in ChunkState}
    for state, n in session.execute(
        select(Chunk.state, func.count()).where(Chunk.job_id == job_id).group_by(Chunk.state)
    ).all():
        counts[str(state)] = int(n)
    return counts


def _queue_position(session: Session, job: Job) -> tuple[int | None, int | None]:
    """Chunks (and interpretations) of the same model that workers take before this job's next queued chunk.

    Workers take queued chunks by priority (9 = most urgent first) then id, as `selfie_jobs.chunks.claim_more` does.
    """
    if job.state in FINAL_JOB_STATES:
        return None, None
    first = session.execute(
        select(Chunk.priority, Chunk.id)
        .where(Chunk.job_id == job.id, Chunk.state == ChunkState.QUEUED)
        .order_by(Chunk.priority.desc(), Chunk.id)
        .limit(1)
    ).first()
    if first is None:
        return None, None
    priority, chunk_id = first
    n, items = session.execute(
        select(func.count(), func.coalesce(func.sum(Chunk.size), 0)).where(
            Chunk.model == job.model,
            Chunk.state == ChunkState.QUEUED,
            Chunk.job_id != job.id,
            or_(Chunk.priority > priority, and_(Chunk.priority == priority, Chunk.id < chunk_id)),
        )
    ).one()
    return int(n), int(items)


def job_view(session: Session, job_id: str, who: Principal, *, with_prompts: bool = True,
             alive_seconds: float | None = None) -> JobView | None:
    """The job's status parts; with `alive_seconds`, a job that still has queued chunks says why it waits."""
    job = visible_job(session, job_id, who)
    if job is None:
        return None
    position, ahead = _queue_position(session, job)
    waiting = wait_reason(session, job.model, alive_seconds) \
        if alive_seconds is not None and position is not None else None
    prompts = list(session.scalars(select(Prompt).where(Prompt.job_id == job.id).order_by(Prompt.index)).all()) \
        if with_prompts else []
    chunks = job_chunk_counts(session, job.id)
    first_claimed = session.scalar(select(func.min(Chunk.started_at)).where(Chunk.job_id == job.id))
    live = job_progress(session, job, running_chunks=chunks[ChunkState.RUNNING.value], alive_seconds=alive_seconds)
    return JobView(job=job, chunks=chunks, queue_position=position, items_ahead=ahead, prompts=prompts,
                   waiting=waiting, first_claimed_at=first_claimed, live=live)


@dataclass
class JobPage:
    jobs: list[Job]
    next_cursor: str | None


def list_jobs(
    session: Session,
    who: Principal,
    *,
    state: str | None = None,
    model: str | None = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
    owner_key_id: int | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> JobPage:
    """Newest first."""
    query = select(Job)
    if not who.is_admin:
        query = query.where(Job.owner_key_id == who.key_id) if who.key_id is not None else query.where(false())
    elif owner_key_id is not None:
        query = query.where(Job.owner_key_id == owner_key_id)
    if state is not None:
        query = query.where(Job.state == state)
    if model is not None:
        query = query.where(Job.model == model)
    if created_after is not None:
        query = query.where(Job.created_at >= created_after)
    if created_before is not None:
        query = query.where(Job.created_at < created_before)
    keys = [(Job.created_at, True), (Job.id, True)]
    if cursor:
        query = query.where(_after(keys, decode_cursor(cursor, "jobs", [datetime, str])))
    rows = list(session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)).all())
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        last = rows[-1]
        next_cursor = encode_cursor("jobs", [last.created_at.isoformat(), last.id])
    return JobPage(jobs=rows, next_cursor=next_cursor)


def cancel_job(session: Session, job_id: str, who: Principal) -> tuple[Job, bool] | None:
    """Cancel a job that is not finished yet, and its queued chunks; (job, whether this call cancelled it).

    Running chunks finish their engine batch, but their results are not stored: the worker sees the job closed.
    The caller commits.
    """
    # The lock every writer of a job's state takes first: a worker's last write cannot land between the state read
    # here and the cancel written from it (SELECT .. FOR UPDATE alone holds nothing on SQLite).
    job = lock_job(session, job_id)
    if job is None or not who.can_see(job.owner_key_id):
        return None
    if job.state in FINAL_JOB_STATES:
        return job, False
    now = utcnow()
    count_stored_rows(session, job)
    job.state = JobState.CANCELLED
    job.finished_at = now
    job.error = job.error or "cancelled by request"
    session.execute(
        update(Chunk)
        .where(Chunk.job_id == job.id, Chunk.state == ChunkState.QUEUED)
        .values(state=ChunkState.CANCELLED, finished_at=now)
        .execution_options(synchronize_session=False)
    )
    session.flush()
    return job, True


# --- interpretations -----------------------------------------------------------------------------------------------

SortName = Literal["position", "relevancy", "-relevancy", "layer", "-layer", "token", "created"]

# Each sort's keys, ending in a unique key within the job: (prompt_index, layer, token) is unique per job, so the
# grid orders need no tie-break; equal relevancies and times are ordered by id. Each order is one index on
# (job_id, *keys) (models.Interpretation; docs/architecture.md, "Result indexes"), read from the cursor on;
# `-layer` reads the layer index backwards, each layer's rows sorted in memory.
_SORTS: dict[str, list[tuple[Any, bool]]] = {
    "position": [(Interpretation.prompt_index, False), (Interpretation.layer, False), (Interpretation.token, False)],
    "relevancy": [(Interpretation.mean_relevancy, False), (Interpretation.id, False)],
    "-relevancy": [(Interpretation.mean_relevancy, True), (Interpretation.id, True)],
    "layer": [(Interpretation.layer, False), (Interpretation.prompt_index, False), (Interpretation.token, False)],
    "-layer": [(Interpretation.layer, True), (Interpretation.prompt_index, False), (Interpretation.token, False)],
    "token": [(Interpretation.prompt_index, False), (Interpretation.token, False), (Interpretation.layer, False)],
    "created": [(Interpretation.created_at, False), (Interpretation.id, False)],
}
SORT_NAMES = tuple(_SORTS)
#: The type of each sort key's value in a cursor.
_KEY_TYPES: dict[str, type] = {"prompt_index": int, "layer": int, "token": int, "mean_relevancy": float, "id": int,
                               "created_at": datetime}


#: Three word characters in a row (letters or digits, what pg_trgm reads as a word's): a `q` holding them has a
#: trigram that ix_interpretations_job_text_trgm can look up.
_TRIGRAM = re.compile(r"[^\W_]{3}")


def text_contains(q: str) -> Any:
    """Rows whose text contains `q` in any case; %, _ and / in `q` are plain characters (autoescape).

    PostgreSQL renders `icontains` as `text ILIKE '%' || :q || '%'`, which the job's trigram index serves (the
    planner takes it for a word it estimates rare in the job). A `q` without a trigram (one or two characters, or
    only punctuation such as '%%') would make pg_trgm read every entry of the job's texts and recheck each row
    (1.4 s for a 100,000-row job, against about 0.5 s for the job's scan; benchmarks/README.md), and the planner
    does not cost that: such a `q` is matched against lower(text), an expression the index does not hold, so the
    job's b-tree is read as before. The meaning is the same: ILIKE compares lower() of both sides, and lower() of
    lower(text) is lower(text). SQLite renders both as lower(...) LIKE lower(...).
    """
    column = Interpretation.text if _TRIGRAM.search(q) else func.lower(Interpretation.text)
    return column.icontains(q, autoescape=True)


@dataclass
class InterpretationFilter:
    prompt: int | None = None
    layer_min: int | None = None
    layer_max: int | None = None
    token: int | None = None
    source_token: str | None = None
    min_relevancy: float | None = None
    q: str | None = None
    grounded: bool | None = None  # rows not judged (stored before grounding) match neither

    def apply(self, query):
        if self.prompt is not None:
            query = query.where(Interpretation.prompt_index == self.prompt)
        if self.layer_min is not None:
            query = query.where(Interpretation.layer >= self.layer_min)
        if self.layer_max is not None:
            query = query.where(Interpretation.layer <= self.layer_max)
        if self.token is not None:
            query = query.where(Interpretation.token == self.token)
        if self.grounded is not None:
            query = query.where(Interpretation.grounded.is_(self.grounded))
        if self.source_token is not None:
            query = query.where(Interpretation.source_token == self.source_token)
        if self.min_relevancy is not None:
            query = query.where(Interpretation.mean_relevancy >= self.min_relevancy)
        if self.q:
            query = query.where(text_contains(self.q))
        return query


def plan_for_the_word(session: Session, flt: InterpretationFilter) -> None:
    """On PostgreSQL, have the rest of the transaction's statements planned for their own parameters when `flt` has
    a text filter, whose best plan depends on the word (the job's trigram index for a rare one, its b-tree for a
    common one). psycopg prepares a statement it has run 5 times, and PostgreSQL may then plan it once for any
    word: that generic plan read the trigram index for a common word too (a page in 2 ms with its own plan, 50 ms
    with the generic one; benchmarks/README.md). Only for these reads: planning every statement each time made the
    write path's many-row inserts more than twice as slow."""
    if flt.q and session.get_bind().dialect.name == "postgresql":
        session.execute(text("SET LOCAL plan_cache_mode = force_custom_plan"))


@dataclass
class InterpretationPage:
    rows: list[Interpretation]
    next_cursor: str | None


def _sort_values(row: Interpretation, keys: Sequence[tuple[Any, bool]]) -> list[Any]:
    values = []
    for column, _ in keys:
        value = getattr(row, column.key)
        values.append(value.isoformat() if isinstance(value, datetime) else value)
    return values


def _interpretations_query(columns: Sequence[Any], job_id: str, flt: InterpretationFilter, sort: str,
                           cursor: str | None):
    """The job's matching rows as `columns`, in `sort` order, after `cursor`; and the sort's keys."""
    if sort not in _SORTS:
        raise QueryError(f"unknown sort {sort!r}; one of {', '.join(SORT_NAMES)}")
    keys = _SORTS[sort]
    query = flt.apply(select(*columns).where(Interpretation.job_id == job_id))
    if cursor:
        values = decode_cursor(cursor, "interp:" + sort, [_KEY_TYPES[column.key] for column, _ in keys])
        query = query.where(_after(keys, values))
    return query.order_by(*[(c.desc() if d else c.asc()) for c, d in keys]), keys


def interpretations_page(
    session: Session,
    job_id: str,
    flt: InterpretationFilter,
    *,
    sort: str = "position",
    limit: int | None = 100,
    cursor: str | None = None,
) -> InterpretationPage:
    """One page of a job's interpretations (the caller checked visibility); `limit=None` means all."""
    query, keys = _interpretations_query([Interpretation], job_id, flt, sort, cursor)
    plan_for_the_word(session, flt)
    rows, next_cursor = fetch_page(session, query, limit,
                                   lambda last: encode_cursor("interp:" + sort, _sort_values(last, keys)))
    return InterpretationPage(rows=rows, next_cursor=next_cursor)


def fetch_page(session: Session, query: Any, limit: int | None, cursor_after: Any) -> tuple[list[Any], str | None]:
    """The rows of an ordered `query`, at most `limit` of them, and the cursor after the last one when more follow
    (`cursor_after(last_row)`; None on the last page). One row past the limit is read to know whether more follow."""
    if limit is None:
        return list(session.scalars(query).all()), None
    rows = list(session.scalars(query.limit(limit + 1)).all())
    if len(rows) <= limit:
        return rows, None
    rows = rows[:limit]
    return rows, cursor_after(rows[-1])


#: Rows a streamed export fetches from the database at a time (a server-side cursor on PostgreSQL).
EXPORT_BATCH = 2000


def export_columns(table: type, names: Sequence[str]) -> list[Any]:
    """`names` of `table` to select for an export. A JSON column comes as the text stored (what json.dumps wrote
    when the row was stored, so the same text the export would write), not parsed into lists to be written back."""
    columns = []
    for name in names:
        column = getattr(table, name)
        columns.append(cast(column, Text).label(name) if isinstance(column.type, JSON) else column)
    return columns


def stream_rows(session: Session, query: Any, limit: int | None = None) -> Iterator[Sequence[Any]]:
    """The rows of `query` (up to `limit`) as tuples, fetched EXPORT_BATCH at a time through one cursor, so an
    export of any size holds one batch in memory."""
    if limit is not None:
        query = query.limit(limit)
    # Through the session's connection: plain rows, without the ORM's per-row loading (columns only, no entities).
    result = session.connection().execute(query.execution_options(yield_per=EXPORT_BATCH))
    for batch in result.partitions():
        yield from batch


def export_interpretations(
    session: Session, job_id: str, flt: InterpretationFilter, columns: Sequence[str], *, sort: str = "position",
    cursor: str | None = None, limit: int | None = None,
) -> Iterator[Sequence[Any]]:
    """Every matching row (up to `limit`) as a tuple of `columns`, streamed (CSV export of big jobs)."""
    query, _ = _interpretations_query(export_columns(Interpretation, columns), job_id, flt, sort, cursor)
    plan_for_the_word(session, flt)
    return stream_rows(session, query, limit)


def interpretations_csv(
    session: Session, job_id: str, flt: InterpretationFilter, columns: Sequence[str], mode: CsvMode, *,
    sort: str = "position", cursor: str | None = None, limit: int | None = None,
) -> Iterator[str | bytes]:
    """Every matching row (up to `limit`) as a CSV file in pieces, the header first. On PostgreSQL the server writes
    the cells (selfie_jobs.csv_copy: the same bytes, several times faster); elsewhere csv_text writes the rows of
    `export_interpretations`."""
    if session.get_bind().dialect.name != "postgresql":
        yield from csv_text(columns, export_interpretations(session, job_id, flt, columns, sort=sort, cursor=cursor,
                                                            limit=limit), mode)
        return
    query, _ = _interpretations_query(text_cells(Interpretation, columns, mode), job_id, flt, sort, cursor)
    yield from csv_text(columns, (), mode)  # the header line alone
    yield from copy_csv_rows(session, query if limit is None else query.limit(limit))


# --- models -----------------------------------------------------------------------------------------------------


def live_models(session: Session, alive_seconds: float) -> list[dict[str, Any]]:
    """What the live workers serve (from their heartbeats), each with its card minus the tokenizer."""
    return served_models(session, alive_seconds)
