"""A CSV download the client abandons part way gives its database connection back at once, over real HTTP: on
PostgreSQL the server-side COPY is cancelled (a COPY left waiting to write kept its connection, its snapshot and a
lock on `interpretations` until the API stopped, and blocked DROP DATABASE and migrations meanwhile); on SQLite
the export's read transaction ends."""

from __future__ import annotations

import time
import uuid

import pytest
from sqlalchemy import insert, select, text

from selfie_jobs.db import get_engine, session_scope
from selfie_jobs.models import Chunk, Interpretation
from tests.apisupport import live_server, prepare_database, settings_for
from tests.unit.jobs.factories import make_job

ROWS = 20_000  # about 11 MB of CSV: far more than the sockets between the database, the API and the client hold


@pytest.fixture
def big_job(database_url):
    model = "tiny-" + uuid.uuid4().hex[:8]
    prepare_database(database_url, model=model)
    with session_scope(database_url) as s:
        job = make_job(s, model=model, items=[(0, 0, 0)])
        chunk_id = s.scalar(select(Chunk.id).where(Chunk.job_id == job.id))
        s.execute(insert(Interpretation.__table__), [
            {"job_id": job.id, "prompt_index": i // 1000, "layer": i % 1000, "token": 0, "source_token": "tok",
             "text": "an interpretation of about eighty characters, the same for every row of this job",
             "token_ids": list(range(20)), "relevancy": [0.25] * 20, "mean_relevancy": 0.25,
             "chunk_id": chunk_id, "engine_run_id": "r", "worker": "w", "model": model} for i in range(ROWS)])
        job_id = job.id
    return job_id


def _busy_connections(database_url: str) -> list[str]:
    """What the database is doing for others than this query: the queries of connections not idle."""
    engine = get_engine(database_url)
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            return list(conn.execute(text(
                "SELECT query FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() "
                "AND state <> 'idle'")).scalars())
        return []


@pytest.mark.parametrize("path", ["interpretations", "results"])
def test_an_abandoned_csv_download_gives_its_connection_back(database_url, redis_url, big_job, path):
    with live_server(settings_for(database_url, redis_url)) as srv, srv.client() as http:
        for _ in range(3):  # more than one, so that a leak would pile up
            with http.stream("GET", f"/v1/jobs/{big_job}/{path}", params={"format": "csv"}) as response:
                assert response.status_code == 200
                first = next(response.iter_bytes())
                assert first.startswith(b"prompt_index,")
            # the client has closed the connection with most of the file unread
        deadline = time.monotonic() + 10
        while (busy := _busy_connections(database_url)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert busy == []
        # and the API still answers from the same pool, the whole file this time
        whole = http.get(f"/v1/jobs/{big_job}/{path}", params={"format": "csv"})
        assert whole.status_code == 200 and whole.text.count("\r\n") == ROWS + 1
