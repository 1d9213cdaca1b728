"""Result pages and exports (selfie_jobs.queries) on SQLite and PostgreSQL: cursors in every sort order, filters
confined to the job, the plans that keep a page at the job's rows, the streamed export."""

from __future__ import annotations

import json
import random
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import JSON, text

from selfie_jobs import migrate, queries
from selfie_jobs.db import get_sessionmaker
from selfie_jobs.models import Interpretation
from selfie_jobs.queries import SORT_NAMES, InterpretationFilter, interpretations_page
from tests.unit.jobs.factories import make_job

GRID = [(p, layer, token) for p in range(3) for layer in range(5) for token in range(4)]  # 60 rows a job
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


@pytest.fixture
def jobs(database_url):
    """Two jobs with the same grid, their rows stored in a shuffled order (ids follow no sort), with equal
    relevancies and equal times (the tie-breaks count); the other job's texts all hold 'zyzzyva'."""
    migrate.upgrade(database_url)
    maker = get_sessionmaker(database_url)
    with maker() as s:
        mine, other = make_job(s, items=GRID), make_job(s, items=GRID)
        chunk_of = {}
        for job in (mine, other):
            chunk_of[job.id] = s.execute(text("SELECT min(id) FROM chunks WHERE job_id = :j"), {"j": job.id}).scalar()
        rows = [(job, item) for job in (mine, other) for item in GRID]
        random.Random(3).shuffle(rows)
        for n, (job, (p, layer, token)) in enumerate(rows):
            word = "zyzzyva" if job is other else ("Paris" if layer % 2 else "tower")
            s.add(Interpretation(
                job_id=job.id, prompt_index=p, layer=layer, token=token, source_token=f"t{token}",
                text=f"about {word} {n}", token_ids=[n, 2], relevancy=[0.1 * (n % 3), -0.5],
                mean_relevancy=(n % 4) / 4, chunk_id=chunk_of[job.id], engine_run_id="r", worker="w", model="tiny",
                created_at=T0 + timedelta(seconds=n // 5)))
        s.commit()
        yield maker, mine.id, other.id


def _expected(rows: list[Interpretation], sort: str) -> list[int]:
    orders = {
        "position": lambda r: (r.prompt_index, r.layer, r.token),
        "relevancy": lambda r: (r.mean_relevancy, r.id),
        "-relevancy": lambda r: (-r.mean_relevancy, -r.id),
        "layer": lambda r: (r.layer, r.prompt_index, r.token),
        "-layer": lambda r: (-r.layer, r.prompt_index, r.token),
        "token": lambda r: (r.prompt_index, r.token, r.layer),
        "created": lambda r: (r.created_at.replace(tzinfo=timezone.utc), r.id),
    }
    return [r.id for r in sorted(rows, key=orders[sort])]


def _walk(session, job_id: str, flt: InterpretationFilter, sort: str, limit: int) -> list[Interpretation]:
    seen, cursor = [], None
    while True:
        page = interpretations_page(session, job_id, flt, sort=sort, limit=limit, cursor=cursor)
        assert len(page.rows) <= limit
        seen += page.rows
        if page.next_cursor is None:
            return seen
        cursor = page.next_cursor


@pytest.mark.parametrize("sort", SORT_NAMES)
def test_cursor_pages_give_every_row_once_in_the_sort_order(jobs, sort):
    """Equal relevancies and equal times are ordered by id, ascending for `relevancy` and `created`, descending for
    `-relevancy` (the exact reverse of `relevancy`, which the relevancy index reads backwards)."""
    maker, mine, _ = jobs
    with maker() as s:
        everything = interpretations_page(s, mine, InterpretationFilter(), sort=sort, limit=None).rows
        expected = _expected(everything, sort)
        for limit in (1, 7, 60):
            assert [r.id for r in _walk(s, mine, InterpretationFilter(), sort, limit)] == expected
        filtered = [r for r in everything if 1 <= r.layer <= 3 and "paris" in r.text.lower()]
        walked = _walk(s, mine, InterpretationFilter(layer_min=1, layer_max=3, q="PARIS"), sort, 4)
        assert [r.id for r in walked] == _expected(filtered, sort) and len(walked) == 24
    assert len(expected) == len(set(expected)) == len(GRID)


def test_the_text_filter_reads_the_jobs_rows_only(jobs):
    maker, mine, other = jobs
    with maker() as s:
        assert interpretations_page(s, mine, InterpretationFilter(q="zyzzyva"), limit=None).rows == []
        assert len(interpretations_page(s, other, InterpretationFilter(q="ZYZZYVA"), limit=None).rows) == len(GRID)
        rows = interpretations_page(s, mine, InterpretationFilter(q="paris"), sort="-layer", limit=None).rows
    assert rows and {r.job_id for r in rows} == {mine} and all(r.layer % 2 for r in rows)


def _plan(session, query) -> str:
    sql = str(query.limit(101).compile(dialect=session.bind.dialect, compile_kwargs={"literal_binds": True}))
    if session.bind.dialect.name == "sqlite":
        return " | ".join(row[-1] for row in session.execute(text("EXPLAIN QUERY PLAN " + sql)))
    # A handful of rows: PostgreSQL would read them all and sort them; what is checked is which plans the indexes
    # allow (a sort the indexes leave necessary stays in the plan, at the cost these settings give it).
    for setting in ("enable_seqscan", "enable_bitmapscan", "enable_sort"):
        session.execute(text(f"SET LOCAL {setting} = off"))
    return " | ".join(row[0] for row in session.execute(text("EXPLAIN " + sql)))


@pytest.mark.parametrize("sort", SORT_NAMES)
def test_every_sort_reads_an_index_of_the_job_from_the_cursor_on(jobs, sort):
    """A page is read from an index that leads with job_id, in the sort's order and entered at the cursor, so a
    page costs the same at any depth and in a table of any size. Only `-layer` (layer descending, the rest
    ascending) sorts in memory, the rows of one layer at a time on PostgreSQL (incremental sort) and SQLite
    ('RIGHT PART OF ORDER BY')."""
    maker, mine, _ = jobs
    with maker() as s:
        first = interpretations_page(s, mine, InterpretationFilter(), sort=sort, limit=30)
        for cursor in (None, first.next_cursor):
            query, _ = queries._interpretations_query([Interpretation], mine, InterpretationFilter(q="x"), sort,
                                                      cursor)
            plan = _plan(s, query)
            if s.bind.dialect.name == "sqlite":
                assert "USING INDEX" in plan and "(job_id=?" in plan, plan
                if sort == "-layer":
                    assert "TEMP B-TREE FOR RIGHT PART OF ORDER BY" in plan, plan
                else:
                    assert "TEMP B-TREE" not in plan, plan  # the index gives the order: no sort of the job's rows
                if cursor:  # entered at the cursor, not filtered from the job's first row
                    assert "(job_id=? AND " in plan, plan
            else:
                assert "Index Cond: ((job_id)" in plan or "Index Cond: (((job_id)" in plan, plan
                assert "Seq Scan" not in plan, plan
                if sort == "-layer":
                    assert "Incremental Sort" in plan and "Presorted Key: layer" in plan, plan
                else:
                    assert "Sort Key" not in plan, plan  # the index gives the order: no sort of the job's rows
                if cursor:
                    bound = "(layer <= " if sort == "-layer" else "AND (ROW("
                    assert bound in plan.split("Filter:")[0], plan
            s.rollback()


def test_the_export_streams_every_row_with_the_json_as_stored(jobs, monkeypatch):
    """Fetched a few rows at a time (here 7): every matching row once, in order, each a tuple of the columns asked
    for, the JSON columns as the text the row's JSON was stored as (what the pages parse)."""
    from selfie_jobs.csv_cells import export_cell
    from selfie_jobs.queries import export_interpretations

    maker, mine, _ = jobs
    monkeypatch.setattr(queries, "EXPORT_BATCH", 7)
    columns = ("prompt_index", "layer", "token", "relevancy", "token_ids", "mean_relevancy", "created_at")
    with maker() as s:
        pages = interpretations_page(s, mine, InterpretationFilter(layer_min=1), sort="-relevancy", limit=None).rows
        exported = list(export_interpretations(s, mine, InterpretationFilter(layer_min=1), columns,
                                               sort="-relevancy"))
        limited = list(export_interpretations(s, mine, InterpretationFilter(), columns, limit=9))
    assert [tuple(r[:3]) for r in exported] == [(r.prompt_index, r.layer, r.token) for r in pages]
    assert len(exported) == 48 and len(limited) == 9
    json_columns = {i for i, name in enumerate(columns)
                    if isinstance(Interpretation.__table__.c[name].type, JSON)}
    assert json_columns, "no JSON column to check"
    for row, page_row in zip(exported, pages, strict=True):
        assert all(isinstance(row[i], str) for i in json_columns)  # not parsed into lists to be dumped again
        assert export_cell(row[3]) == json.dumps(page_row.relevancy)
        assert export_cell(row[4]) == json.dumps(page_row.token_ids) and row[5] == page_row.mean_relevancy
        assert row[6] == page_row.created_at


@pytest.mark.postgres
def test_postgres_connections_run_without_jit(postgres_url):
    """JIT compiling of the text filter's scan cost more than it saved; options given in the URL are kept."""
    from selfie_jobs.db import create_db_engine

    for url, work_mem in ((postgres_url, None), (postgres_url + "?options=-c%20work_mem%3D7MB", "7MB")):
        engine = create_db_engine(url)
        try:
            with engine.connect() as conn:
                assert conn.execute(text("SHOW jit")).scalar() == "off"
                if work_mem:
                    assert conn.execute(text("SHOW work_mem")).scalar() == work_mem
        finally:
            engine.dispose()


# --- the text filter ------------------------------------------------------------------------------------------------

TEXTS = ["Paris at night", "PARIS", "a%b", "a_b", "axb", "50% off", "__init__", "back\\slash", "a/b", "École",
         "école", "ÉCOLE normale", "café Été", "x", "nothing here"]
QUERIES = ["paris", "PaRiS", "a%b", "a_b", "%", "_", "__", "%_", "\\", "/", "a/b", "x", "ab", "É", "é", "éco",
           "ÉCOLE", "été", "café", "zyzzyva", " ", "night"]


def _folded(dialect: str):
    """What `lower()` does in each database: PostgreSQL (UTF-8) folds every letter as Python does for these texts;
    SQLite's built-in lower() folds ASCII letters only (without the ICU extension), so there 'é' does not find
    'É': the filter's meaning on SQLite, unchanged here."""
    if dialect == "postgresql":
        return str.lower
    return lambda s: "".join(c.lower() if c.isascii() else c for c in s)


@pytest.fixture
def texts(database_url):
    migrate.upgrade(database_url)
    maker = get_sessionmaker(database_url)
    with maker() as s:
        job = make_job(s, items=[(0, 0, t) for t in range(len(TEXTS))])
        chunk = s.execute(text("SELECT min(id) FROM chunks WHERE job_id = :j"), {"j": job.id}).scalar()
        for n, body in enumerate(TEXTS):
            s.add(Interpretation(
                job_id=job.id, prompt_index=0, layer=0, token=n, source_token="t", text=body, token_ids=[n],
                relevancy=[0.5], mean_relevancy=0.5, chunk_id=chunk, engine_run_id="r", worker="w", model="tiny"))
        s.commit()
        yield maker, job.id


def test_the_text_filter_is_contains_in_any_case_with_plain_percent_underscore_and_slash(texts):
    """Exactly the rows whose text contains `q` ignoring case, for a `q` with a trigram (the spelling the trigram
    index serves) and without one (one or two characters, only %, _ or punctuation): the same meaning. On
    PostgreSQL each `q` is also answered by bitmap scans only, which take the trigram index for every `q` with a
    trigram: its answers are rechecked against the text, the same rows."""
    maker, job_id = texts
    with maker() as s:
        dialect = s.bind.dialect.name
        fold = _folded(dialect)
        for q in QUERIES:
            expected = [n for n, body in enumerate(TEXTS) if fold(q) in fold(body)]
            rows = interpretations_page(s, job_id, InterpretationFilter(q=q), limit=None).rows
            assert [r.token for r in rows] == expected, q
            if dialect == "postgresql":
                for setting in ("enable_seqscan", "enable_indexscan"):
                    s.execute(text(f"SET LOCAL {setting} = off"))
                rows = interpretations_page(s, job_id, InterpretationFilter(q=q), limit=None).rows
                assert [r.token for r in rows] == expected, q
                s.rollback()
    assert fold("É") == ("é" if dialect == "postgresql" else "É")


@pytest.fixture
def stored_texts(postgres_url):
    """PostgreSQL with 60,000 rows in 30 jobs of 2,000 (as ANALYZE sees them), a third of the texts holding 'Paris',
    the others 'tower', each with a distinct hex tail (no text holds 'zyzzyva'), and relevancies spread over [0, 1)."""
    migrate.upgrade(postgres_url)
    maker = get_sessionmaker(postgres_url)
    with maker() as s:
        jobs = [make_job(s, items=[(0, 0, 0)]) for _ in range(30)]
        for job in jobs:
            chunk = s.execute(text("SELECT min(id) FROM chunks WHERE job_id = :j"), {"j": job.id}).scalar()
            s.execute(text(
                "INSERT INTO interpretations (job_id, prompt_index, layer, token, source_token, text, token_ids, "
                "relevancy, mean_relevancy, chunk_id, engine_run_id, worker, model, created_at) "
                "SELECT CAST(:job AS text), n / 100, n % 100, 0, 't', "
                "CASE WHEN n % 3 = 0 THEN 'about Paris ' ELSE 'about tower ' END "
                "|| md5(n::text || CAST(:job AS text)), '[1]', '{0.5}'::real[], (n * 7919 % 2000) / 2000.0, "
                ":chunk, 'r', 'w', 'tiny', now() FROM generate_series(0, 1999) AS n"),
                {"job": job.id, "chunk": chunk})
        s.commit()
        s.execute(text("ANALYZE interpretations"))
        s.commit()
        yield maker, jobs[2].id


def _bound_plan(session, query) -> str:
    """EXPLAIN of the page's statement as the route sends it: the SQL with its bind parameters, which psycopg
    sends apart from the text (server-side parameters), not values written into the SQL."""
    compiled = query.limit(101).compile(dialect=session.bind.dialect)
    rows = session.connection().exec_driver_sql("EXPLAIN " + str(compiled), compiled.params)
    return " | ".join(row[0] for row in rows)


@pytest.mark.postgres
def test_the_text_filter_reads_the_jobs_trigram_index_for_a_rare_word_only(stored_texts):
    """A word no row has is looked up in the job's trigram index; a word a third of the rows hold reads the job's
    b-tree in the sort's order until the page is full; a `q` without a trigram (short, or %/_ only) never reaches
    the trigram index (pg_trgm would read all of the job's entries, and the planner does not know it)."""
    maker, job_id = stored_texts
    with maker() as s:
        for sort in ("position", "-relevancy"):
            for cursor in (None, interpretations_page(s, job_id, InterpretationFilter(), sort=sort,
                                                      limit=30).next_cursor):
                for q in ("zyzzyva", "ZYZZYVA", "paris", "zy", "x", "%%", "_/", "%_a"):
                    query, _ = queries._interpretations_query([Interpretation], job_id, InterpretationFilter(q=q),
                                                              sort, cursor)
                    plan = _bound_plan(s, query)
                    if q.lower() == "zyzzyva":
                        assert "Bitmap Index Scan on ix_interpretations_job_text_trgm" in plan, (q, plan)
                        assert "(job_id)::text = " in plan.split("ix_interpretations_job_text_trgm")[1], plan
                    else:
                        assert "trgm" not in plan and "Seq Scan" not in plan, (q, plan)
                        assert "Index Scan" in plan, (q, plan)
                        assert "Index Cond: ((job_id)" in plan or "Index Cond: (((job_id)" in plan, (q, plan)
        assert interpretations_page(s, job_id, InterpretationFilter(q="zyzzyva"), limit=None).rows == []
        assert len(interpretations_page(s, job_id, InterpretationFilter(q="PARIS"), limit=None).rows) == 667


@pytest.mark.postgres
def test_a_statement_run_again_is_planned_for_its_own_word(stored_texts):
    """psycopg prepares a statement run 5 times; PostgreSQL would then plan it once for every word, and that plan
    read the trigram index for a common word too. Each page with `q` is planned for its word."""
    maker, job_id = stored_texts
    with maker() as s:
        for _ in range(15):
            assert len(interpretations_page(s, job_id, InterpretationFilter(q="paris"), limit=100).rows) == 100
        plans = s.execute(text("SELECT generic_plans, custom_plans FROM pg_prepared_statements "
                               "WHERE statement LIKE '%ILIKE%'")).all()
    assert len(plans) == 1 and plans[0].generic_plans == 0 and plans[0].custom_plans >= 10, plans
