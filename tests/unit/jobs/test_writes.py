"""The write path's statements (selfie_jobs.writes, selfie_jobs.bulk) on real SQLite and PostgreSQL: what they store
is what a Core insert of the same rows stores, for every result table, and a write sends the statements it should."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from sqlalchemy import LargeBinary, Text, cast, event, func, insert, select
from sqlalchemy.orm import Session

from selfie_jobs import chunks as C
from selfie_jobs.db import create_db_engine, get_sessionmaker
from selfie_jobs.kinds import all_kinds
from selfie_jobs.kinds.edits import VariantRow
from selfie_jobs.kinds.generate import GenerationRow
from selfie_jobs.kinds.interpret import ResultRow
from selfie_jobs.kinds.lenses import LensRow
from selfie_jobs.kinds.vectors import VectorRow
from selfie_jobs.models import Chunk, Interpretation, Job
from tests.unit.jobs.factories import make_job
from tests.unit.jobs.test_races import run_while_a_cancel_commits

NOW = datetime(2026, 5, 4, 3, 2, 1, 123456, tzinfo=timezone.utc)
NUL_TEXT = "a\x00b \u00e9\u4e2d\U0001f600 'quoted' \"double\" \\ %s ?"


@pytest.fixture
def db(migrated_database_url):
    return get_sessionmaker(migrated_database_url)


def _lenses(n: int, *, empty: bool) -> dict:
    out = {"model_token_ids": [n, 2], "model_tokens": [NUL_TEXT, "x"], "model_probs": [0.5, 1e-30]}
    for prefix in ("logit", "identity"):
        if empty:  # no such lens: every column NULL
            out |= {f"{prefix}_token_ids": None, f"{prefix}_tokens": None, f"{prefix}_probs": None,
                    f"{prefix}_matches": None, f"{prefix}_model_prob": None}
        else:
            out |= {f"{prefix}_token_ids": [7], f"{prefix}_tokens": ["\x00"], f"{prefix}_probs": [0.25],
                    f"{prefix}_matches": n % 2 == 0, f"{prefix}_model_prob": 0.1 + n}
    return out


def _sample_rows(variant: str) -> dict[type, list]:
    """Rows of every result table, NULLs, NUL characters and odd floats included, the first two with the same
    key (the second is a duplicate within the call: skipped)."""
    relevancy = [0.1, 3.4028234663852886e38, -0.0, 1e-45]
    return {
        Interpretation: [
            ResultRow(0, 1, 2, "src", NUL_TEXT, [1, 2], relevancy, 0.1),
            ResultRow(0, 1, 2, "dup", "dup", [9], [9.0], 9.0),
            ResultRow(0, 1, 3, "", "", [], [], float("1e-300"), grounded=False, ungrounded_reason="no_match"),
            ResultRow(1, 0, 0, NUL_TEXT, "NULL", [3], [0.5], 0.5, grounded=True),
            ResultRow(1, 0, 1, "{a,b}", " spaced ", [3], [0.5], 0.5),
        ],
        VectorRow.TABLE: [
            VectorRow(0, NUL_TEXT, 1.5, "v", [4], relevancy, 0.25),
            VectorRow(0, "dup", 9.0, "dup", [9], [9.0], 9.0),
            VectorRow(1, "NULL", 0.0, NUL_TEXT, [], [], 0.0),
        ],
        LensRow.TABLE: [
            LensRow(0, 1, 2, NUL_TEXT, _lenses(0, empty=False)),
            LensRow(0, 1, 2, "dup", _lenses(9, empty=False)),
            LensRow(0, 1, 3, "s", _lenses(1, empty=True)),
        ],
        GenerationRow.TABLE: [
            GenerationRow(0, NUL_TEXT, [1, 2, 0], "eos"),
            GenerationRow(0, "dup", [9], "length"),
            GenerationRow(1, "", [], "length"),
        ],
        VariantRow.TABLE: [
            VariantRow(f"{variant}a", None, "supervised", 3, "/v/a", "0" * 64, {"lr": 1e-4, "t": NUL_TEXT},
                       [{"epoch": 0, "loss": None}], {"x": [1, 2.5, None]}),
            VariantRow(f"{variant}b", None, "reinforce", 4, "/v/b", "1" * 64, {}, [], {}),
        ],
    }


def _stored(session: Session, table, job_id: str) -> list[tuple]:
    """Each row's columns as the database holds them: text as the database writes it out, binary as its bytes;
    not the keys that differ between the two jobs."""
    columns = [c for c in table.columns if c.name not in ("id", "job_id", "chunk_id")]
    exprs = [c if isinstance(c.type, LargeBinary) or isinstance(getattr(c.type, "impl", None), LargeBinary)
             else cast(c, Text) for c in columns]
    order = [table.c[c] for c in table.columns.keys() if c == "id"]
    return [tuple(bytes(v) if isinstance(v, memoryview) else v for v in row)
            for row in session.execute(select(*exprs).where(table.c.job_id == job_id).order_by(*order))]


def test_every_result_table_stores_what_a_core_insert_stores(db):
    """The write path's insert (one unnest statement on PostgreSQL, an executemany on SQLite) stores every column
    byte for byte as SQLAlchemy's Core insert of the same rows does: JSON text, float32 bytes, NUL-free text,
    NULLs; a key repeated within the call is skipped (the first row kept) and not counted."""
    samples = _sample_rows("w")
    tables = {kind.table for kind in all_kinds().values()}
    assert tables <= set(samples), "a result table without sample rows"
    with db() as s, s.begin():
        ids = {}
        for name in ("write", "core"):
            job = make_job(s, chunk_size=8)
            ids[name] = (job.id, s.scalar(select(Chunk.id).where(Chunk.job_id == job.id)))
    for entity, rows in samples.items():
        table = entity.__table__
        with db() as s, s.begin():
            job_id, chunk_id = ids["write"]
            outcome = C.write_results(s, chunk_id, "w", rows, engine_run_id="run", worker="w", model="tiny",
                                      complete=False, now=NOW)
            assert outcome.inserted == len(rows) - 1, entity
            again = C.write_results(s, chunk_id, "w", rows, engine_run_id="run", worker="w", model="tiny",
                                    complete=False, now=NOW)
            assert again.inserted == 0, entity
        core_rows = [r for i, r in enumerate(_sample_rows("c")[entity]) if i != 1]
        with db() as s, s.begin():
            job_id, chunk_id = ids["core"]
            s.execute(insert(table), [{"job_id": job_id, "chunk_id": chunk_id, "engine_run_id": "run", "worker": "w",
                                       "model": "tiny", "created_at": NOW, **r.values(C.storable_text)}
                                      for r in core_rows])
        with db() as s:
            written, core = _stored(s, table, ids["write"][0]), _stored(s, table, ids["core"][0])
        assert len(written) == len(rows) - 1 and "dup" not in str(written), entity
        if entity is VariantRow.TABLE:  # the variant's own id differs (w.. and c..); unique per job: one row
            assert len(written) == 1
        assert written == core, entity


def _statements_of(engine, work) -> list[tuple[str, bool]]:
    sent: list[tuple[str, bool]] = []

    def watch(_conn, _cursor, statement, _params, _context, executemany):
        sent.append((statement.split()[0].upper(), executemany))

    event.listen(engine, "before_cursor_execute", watch)
    try:
        work()
    finally:
        event.remove(engine, "before_cursor_execute", watch)
    return sent


def test_a_completing_write_sends_one_statement_per_step(db, migrated_database_url):
    """PostgreSQL: SAVEPOINT, the rows in ONE execution (the job's id read from the chunk), the job's lock with its
    state, the completion. SQLite: the write lock with the chunk's job, the rows, the chunk marked, the job."""
    with db() as s, s.begin():
        job = make_job(s, chunk_size=8)
        job_id, chunk_id = job.id, s.scalar(select(Chunk.id).where(Chunk.job_id == job.id))
    with db() as s, s.begin():
        claimed = C.claim_chunk(s, chunk_id, "w1", 60)
    rows = [ResultRow(p, layer, t, "tok", "text", [1], [0.5], 0.5) for p, layer, t in claimed.items]
    engine = create_db_engine(migrated_database_url)
    try:
        outcomes = []
        sent = _statements_of(engine, lambda: outcomes.append(C.complete_chunk(
            lambda: Session(engine), chunk_id, "w1", rows, engine_run_id="r", worker="w1", model="tiny")))
    finally:
        engine.dispose()
    assert outcomes[0] == C.WriteOutcome(8, True, "succeeded")
    if engine.dialect.name == "postgresql":
        assert sent == [("SAVEPOINT", False), ("INSERT", False), ("SELECT", False), ("WITH", False)]
    else:
        assert sent == [("UPDATE", False), ("INSERT", True), ("UPDATE", False), ("UPDATE", False)]
    with db() as s:
        assert s.scalar(select(func.count()).select_from(Interpretation).where(Interpretation.job_id == job_id)) == 8
        assert (s.get(Job, job_id).state, s.get(Job, job_id).done) == ("succeeded", 8)


@pytest.fixture
def other_engine(migrated_database_url):
    engine = create_db_engine(migrated_database_url)
    yield engine
    engine.dispose()


def test_a_completing_write_whose_job_is_cancelled_meanwhile_stores_nothing_and_closes_the_chunk(db, other_engine):
    """The rows of a write that completes its chunk wait on a cancel that holds the job's lock: once it commits,
    none of them is stored (PostgreSQL takes them back to the savepoint; SQLite's writer waits first), the chunk
    is closed, and the cancel's count of stored rows stands."""
    with db() as s, s.begin():
        job = make_job(s, chunk_size=4)
        job_id = job.id
        first, second = s.scalars(select(Chunk.id).where(Chunk.job_id == job.id).order_by(Chunk.index))
    with db() as s, s.begin():
        done_rows = [ResultRow(p, layer, t, "tok", "text", [1], [0.5], 0.5)
                     for p, layer, t in C.claim_chunk(s, first, "w1", 60).items]
        late_rows = [ResultRow(p, layer, t, "tok", "text", [1], [0.5], 0.5)
                     for p, layer, t in C.claim_chunk(s, second, "w1", 60).items]
    # the rows of the second chunk's first half are stored, its completion comes after the cancel
    assert C.complete_chunk(db, first, "w1", done_rows, engine_run_id="r", worker="w1", model="tiny").chunk_done
    assert C.complete_chunk(db, second, "w1", late_rows[:2], engine_run_id="r", worker="w1", model="tiny",
                            complete=False).inserted == 2

    def complete():
        with Session(other_engine) as s, s.begin():
            return C.write_results(s, second, "w1", late_rows[2:], engine_run_id="r", worker="w1", model="tiny",
                                   complete=True)

    outcome = run_while_a_cancel_commits(db, other_engine, job_id, complete)
    assert (outcome.inserted, outcome.chunk_done, outcome.skipped_reason) == (0, False, "job is cancelled")
    with db() as s:
        stored = s.scalar(select(func.count()).select_from(Interpretation).where(Interpretation.job_id == job_id))
        job = s.get(Job, job_id)
        assert (stored, job.state, job.done) == (6, "cancelled", 6)
        assert [s.get(Chunk, c).state for c in (first, second)] == ["done", "cancelled"]


def test_a_write_into_a_chunk_that_is_gone_stores_nothing(db):
    with db() as s, s.begin():
        job = make_job(s, chunk_size=8)
        chunk_id = s.scalar(select(Chunk.id).where(Chunk.job_id == job.id))
    rows = [ResultRow(0, 0, 0, "tok", "text", [1], [0.5], 0.5)]
    outcome = C.complete_chunk(db, chunk_id + 1000, "w1", rows, engine_run_id="r", worker="w1", model="tiny")
    assert outcome == C.WriteOutcome(0, False, None, "chunk is gone")
    with db() as s:
        assert s.scalar(select(func.count()).select_from(Interpretation)) == 0


def test_numbers_of_mixed_python_types_and_lone_surrogates_are_stored(db):
    # 1 and 0.5 in one Float column of one write (psycopg's binary lists need one element type), and text a broken
    # tokenizer's decoding can leave: half of a UTF-16 pair, which neither driver can encode as UTF-8
    with db() as s, s.begin():
        job = make_job(s, chunk_size=8)
        chunk_id = s.scalar(select(Chunk.id).where(Chunk.job_id == job.id))
        C.claim_chunk(s, chunk_id, "w1", 600)
    rows = [ResultRow(0, 0, 0, "a\ud800b", "x\udfff", [1], [1, 0.5], 1),
            ResultRow(0, 0, 1, "tok", "text", [2], [0.25], 0.5)]
    outcome = C.complete_chunk(db, chunk_id, "w1", rows, engine_run_id="r", worker="w1", model="tiny",
                               complete=False)
    assert outcome.inserted == 2
    with db() as s:
        stored = s.execute(select(Interpretation.source_token, Interpretation.text, Interpretation.mean_relevancy,
                                  Interpretation.relevancy).where(Interpretation.job_id == job.id)
                           .order_by(Interpretation.token)).all()
    assert [tuple(r) for r in stored] == [("a\ufffdb", "x\ufffd", 1.0, [1.0, 0.5]), ("tok", "text", 0.5, [0.25])]
