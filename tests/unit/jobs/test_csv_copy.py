"""The CSV PostgreSQL writes (selfie_jobs.csv_copy) is the CSV Python writes (selfie_jobs.csv_cells), byte for byte:
on values chosen where the two spell things differently (whole floats, 1e15 to 1e16, NaN and the infinities, -0.0,
subnormals, float32 lists, empty text and NULL, formula-like text, quotes, commas, CR and LF, unicode, times with
and without microseconds), in both CSV modes, every sort, with filters, a cursor and a limit."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import insert, select, text

from selfie_jobs.csv_cells import csv_text
from selfie_jobs.db import get_sessionmaker
from selfie_jobs.models import Chunk, Interpretation
from selfie_jobs.queries import (
    SORT_NAMES,
    InterpretationFilter,
    export_interpretations,
    interpretations_csv,
    interpretations_page,
)
from tests.unit.jobs.factories import make_job

pytestmark = pytest.mark.postgres

COLUMNS = ("prompt_index", "layer", "token", "source_token", "text", "mean_relevancy", "grounded",
           "ungrounded_reason", "relevancy", "token_ids", "worker", "model", "created_at")

TEXTS = ["", "plain", "=1+1", "-5", "-5.5e3", "+x", "@a", "\tx", "\rx", "a,b", 'a"b', '"', "'", "line\nbreak",
         "cr\rx", "a\r\nb", " lead and trail ", "unicode 中😀 é", "\\.", "\\N", "NULL", "-", "1e5", "-0x1F", "=",
         "a\u2028b", "\u00a0nbsp", "-5x5"]
FLOATS = [0.0, -0.0, 1.0, -1.0, 0.1, 123.0, -2.5, 1e-05, 1.5e-05, 0.0001, 1e15, 1.5e15, 1234567890123456.8,
          9.999999999999998e15, 1e16, 1.5e16, 999999999999999.9, 5e-324, 1.7976931348623157e308, -1e15,
          float("nan"), float("inf"), float("-inf"), 2.0 ** 53, 1 / 3]
LISTS = [[], [0.0], [-0.0], [1.0, 2.0, -3.0], [0.1, 1e-05, 1.5e-05], [1e15], [5e15], [-5e15], [3.4028234663852886e38],
         [1e-45], [-1.17549435e-38], [16777216.0, 0.5], [1e16, 2e17], [0.7399048272087007, 1 / 3, 1e-7] * 7]


@pytest.fixture
def job_id(postgres_url):
    from selfie_jobs.migrate import upgrade

    upgrade(postgres_url)
    maker = get_sessionmaker(postgres_url)
    n = max(len(TEXTS), len(FLOATS), len(LISTS)) * 2
    start = datetime(2026, 12, 1, 3, 4, 5, tzinfo=timezone.utc)
    with maker() as s, s.begin():
        job = make_job(s, items=[(i % 3, i % 5, i) for i in range(n)], chunk_size=n)
        chunk_id = s.scalar(select(Chunk.id).where(Chunk.job_id == job.id))
        s.execute(insert(Interpretation.__table__), [{
            "job_id": job.id, "prompt_index": i % 3, "layer": i % 5, "token": i,
            "source_token": TEXTS[(i + 3) % len(TEXTS)], "text": TEXTS[i % len(TEXTS)],
            "token_ids": [[], [1, 2], [-3]][i % 3], "relevancy": LISTS[i % len(LISTS)],
            "mean_relevancy": FLOATS[i % len(FLOATS)], "grounded": [None, True, False][i % 3],
            "ungrounded_reason": [None, "no_match", "=bad", ""][i % 4], "chunk_id": chunk_id, "engine_run_id": "r",
            "worker": ["w,1", 'w"2', "-w3", "w4"][i % 4], "model": "tiny",
            # a whole second every other row: isoformat then leaves the microseconds out
            "created_at": start + timedelta(seconds=i, microseconds=0 if i % 2 else 1234 * i)}
            for i in range(n)])
        return job.id


def _both(url, job_id, flt=InterpretationFilter(), **kw):
    """(what PostgreSQL's COPY writes, what csv.writer writes over the same rows)."""
    maker = get_sessionmaker(url)
    mode = kw.pop("mode", "safe")
    with maker() as s:
        fast = b"".join(p if isinstance(p, bytes) else p.encode() for p in
                        interpretations_csv(s, job_id, flt, COLUMNS, mode, **kw))
    with maker() as s:
        slow = "".join(csv_text(COLUMNS, export_interpretations(s, job_id, flt, COLUMNS, **kw), mode)).encode()
    return fast, slow


@pytest.mark.parametrize("mode", ["safe", "raw"])
def test_every_cell_is_what_python_writes(postgres_url, job_id, mode):
    fast, slow = _both(postgres_url, job_id, mode=mode)
    assert fast.count(b"\r\n") >= 2 * max(len(TEXTS), len(FLOATS), len(LISTS))
    assert fast.splitlines(keepends=True) == slow.splitlines(keepends=True)
    assert fast == slow


@pytest.mark.parametrize("sort", SORT_NAMES)
def test_every_sort_filter_cursor_and_limit_gives_the_same_rows(postgres_url, job_id, sort):
    maker = get_sessionmaker(postgres_url)
    with maker() as s:
        cursor = interpretations_page(s, job_id, InterpretationFilter(), sort=sort, limit=7).next_cursor
    for flt, kw in [(InterpretationFilter(), {}), (InterpretationFilter(layer_min=1, layer_max=3, grounded=True), {"limit": 5}),
                    (InterpretationFilter(source_token="a,b", prompt=1), {}),
                    (InterpretationFilter(q="lead"), {}), (InterpretationFilter(q="%"), {}),
                    (InterpretationFilter(), {"cursor": cursor}), (InterpretationFilter(min_relevancy=0.5), {})]:
        fast, slow = _both(postgres_url, job_id, flt, sort=sort, **kw)
        assert fast == slow, (flt, kw)


def test_a_session_that_rounds_floats_still_gets_every_digit(postgres_url, job_id):
    """extra_float_digits below 1 makes PostgreSQL round float8 to 15 digits; the export sets it for itself."""
    maker = get_sessionmaker(postgres_url)
    with maker() as s:
        s.execute(text("SET extra_float_digits = -3"))
        fast = b"".join(p if isinstance(p, bytes) else p.encode()
                        for p in interpretations_csv(s, job_id, InterpretationFilter(), COLUMNS, "raw"))
    assert fast == _both(postgres_url, job_id, mode="raw")[1]
    assert b"0.10000000149011612" in fast  # float32's 0.1 with every digit of the double it is


@pytest.mark.parametrize("setting", ["standard_conforming_strings = off", "client_encoding = 'LATIN1'"])
def test_a_session_set_otherwise_gets_the_same_file(postgres_url, job_id, setting):
    """Backslashes in string literals read as escapes, another client encoding: the export's patterns hold no
    backslash, and it sets UTF-8 for itself (the response says charset=utf-8)."""
    maker = get_sessionmaker(postgres_url)
    with maker() as s:
        s.execute(text(f"SET {setting}"))
        fast = b"".join(p if isinstance(p, bytes) else p.encode()
                        for p in interpretations_csv(s, job_id, InterpretationFilter(), COLUMNS, "safe"))
    assert fast == _both(postgres_url, job_id, mode="safe")[1]


def test_a_client_that_stops_reading_leaves_the_connection_usable(postgres_url, job_id):
    """The COPY is cancelled when the stream is closed part way; the pool's connection then serves the next read."""
    maker = get_sessionmaker(postgres_url)
    with maker() as s:
        pieces = interpretations_csv(s, job_id, InterpretationFilter(), COLUMNS, "safe")
        assert next(pieces).startswith("prompt_index,")
        pieces.close()
    with maker() as s:
        assert s.execute(text("SELECT 1")).scalar_one() == 1
        assert len(interpretations_page(s, job_id, InterpretationFilter(), limit=3).rows) == 3
