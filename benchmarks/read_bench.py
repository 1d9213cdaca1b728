"""Reads at scale: the results routes of one 100,000-row job among millions of other stored rows.

Generates `--total` synthetic interpretation rows (default 10,000,000) in a database made by the project's
migrations: one job of `--job-rows` (default 100,000: 10 prompts x 40 layers x 250 tokens) whose chunks were
written interleaved with those of four other jobs running at the same time, as cross-job batching writes them,
among jobs of 10,000 rows. Rows are written fast: COPY on PostgreSQL, executemany in transactions of 100,000 rows
on SQLite, with the table's secondary indexes and constraints built after the load (the generation time is
printed). Texts are about 80 characters; about a third of them hold the word "paris", none holds "zyzzyva";
relevancy is 20 floats, token_ids 20 ints. Chunks carry no items (the reads never look at them).

Then it asks the FastAPI app (in process, through Starlette's TestClient, so every request runs the routes, the
queries and the JSON/CSV serialisation as served) for the job's
- `/results` first page and a deep cursor page (the page after 90% of the rows, reached by walking the cursors);
- `/interpretations` first page in every sort order, a deep cursor page in every sort order, a layer filter (one
  layer; a range of three), the text filter with a word no row has and with a common one;
and prints p50/p95 of `--repeats` requests of each (100 rows a page) and the median CPU time this process spent on
one (the API's threads and the client's; the database server's is not in it), then streams the whole job as CSV
(`/interpretations?format=csv` and `/results?format=csv`) and prints rows/s, rows per CPU-second of this process
and the peak growth of the process's resident memory while it streams. The naive reference in the same run: the
same rows read by the driver alone (a plain SELECT of the job's rows, its cursor iterated, each row written by
csv.writer), rows/s.

    .venv/bin/python benchmarks/read_bench.py --db postgres [--total 10000000] [--repeats 30]
    .venv/bin/python benchmarks/read_bench.py --db sqlite --total 1000000

The generated database is kept (PostgreSQL database `selfie_read_bench_<total>`, SQLite file
`/tmp/selfie-read-bench-<total>.db`) and reused by the next run with the same total, after running the
migrations on it (so a new index migration is measured on the stored rows; its time is printed); `--fresh`
generates it again, `--drop` deletes it at the end.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
import statistics
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from selfie_jobs import migrate  # noqa: E402
from selfie_jobs.models import Interpretation  # noqa: E402

TARGET_JOB = "a" * 32
PROMPTS, LAYERS, TOKENS = 10, 40, 250  # the target job's grid (100,000 rows by default)
OTHER_JOB_ROWS = 10_000
CONCURRENT_JOBS = 5  # the target job and four others run at once: their chunks interleave in the table
CHUNK = 64
MODEL = "bench-model"
COMMON_WORD, ABSENT_WORD = "paris", "zyzzyva"
COLUMNS = ("id", "job_id", "prompt_index", "layer", "token", "source_token", "text", "token_ids", "relevancy",
           "mean_relevancy", "chunk_id", "engine_run_id", "worker", "model", "created_at")
WORDS = ("the city of light is a place where people meet and talk about art music food history river bridge "
         "tower museum garden street night morning language story number animal capital country").split()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# --- generation ---------------------------------------------------------------------------------------------------


def value_pool(dialect, n: int = 997) -> list[tuple]:
    """`n` distinct (source_token, text, token_ids, relevancy, mean) as the database takes them: the relevancy and
    token_ids through their column types, so the rows are what the models would store."""
    rng = random.Random(7)
    rel_type = Interpretation.__table__.c.relevancy.type
    ids_type = Interpretation.__table__.c.token_ids.type
    rel_bind = rel_type.dialect_impl(dialect).bind_processor(dialect)
    ids_bind = ids_type.dialect_impl(dialect).bind_processor(dialect)

    def stored(bind, value):
        value = bind(value) if bind else value
        # a list the column type leaves as a list is an array (relevancy on PostgreSQL: real[]), which COPY takes
        return json.dumps(value) if isinstance(value, dict) or (isinstance(value, list) and bind is ids_bind) \
            else value

    pool = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(16)]
        if i % 3 == 0:
            words[rng.randrange(16)] = COMMON_WORD.capitalize()
        body = " ".join(words)[:80]
        relevancy = [round(rng.uniform(-0.5, 1.0), 6) for _ in range(20)]
        pool.append((rng.choice(WORDS), body, stored(ids_bind, [rng.randrange(50_000) for _ in range(20)]),
                     stored(rel_bind, relevancy), sum(relevancy) / 20))
    return pool


def job_plan(total: int, job_rows: int) -> list[tuple[str, int]]:
    """(job id, rows) of every job, in the order they were submitted; the target job in the middle."""
    others, left = [], total - job_rows
    while left > 0:
        others.append(min(OTHER_JOB_ROWS, left))
        left -= others[-1]
    jobs = [(f"{i:032x}", n) for i, n in enumerate(others, start=1)]
    jobs.insert(len(jobs) // 2, (TARGET_JOB, job_rows))
    return jobs


def target_item(i: int) -> tuple[int, int, int]:
    prompt, rest = divmod(i, LAYERS * TOKENS)
    layer, token = divmod(rest, TOKENS)
    return prompt, layer, token


def other_item(i: int) -> tuple[int, int, int]:
    prompt, rest = divmod(i, 20 * 25)
    layer, token = divmod(rest, 25)
    return prompt, layer, token


def row_stream(jobs: list[tuple[str, int]], pool: list[tuple]):
    """Every row, chunk by chunk: CONCURRENT_JOBS jobs at a time, their chunks interleaved round-robin.
    Yields ('chunk', (chunk id, job id, index, size)) before a chunk's rows and ('row', tuple) for each row."""
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    row_id = chunk_id = 0
    for g in range(0, len(jobs), CONCURRENT_JOBS):
        group = [[job, n, 0, 0] for job, n in jobs[g:g + CONCURRENT_JOBS]]  # job, rows, written, chunk index
        while group:
            for state in list(group):
                job, n, written, index = state
                size = min(CHUNK, n - written)
                chunk_id += 1
                yield "chunk", (chunk_id, job, index, size)
                items = target_item if job == TARGET_JOB else other_item
                for k in range(written, written + size):
                    row_id += 1
                    source_token, body, token_ids, relevancy, mean = pool[row_id % len(pool)]
                    p, layer, token = items(k)
                    yield "row", (row_id, job, p, layer, token, source_token, body, token_ids, relevancy, mean,
                                  chunk_id, f"{chunk_id:032x}", "bench-worker", MODEL,
                                  start + timedelta(milliseconds=row_id))
                state[2], state[3] = written + size, index + 1
                if state[2] >= n:
                    group.remove(state)


def _job_rows(jobs):
    created = datetime(2026, 1, 1, tzinfo=timezone.utc)
    return [(job, MODEL, "interpret", "succeeded", 5, "{}", "bench", n, n, created + timedelta(seconds=i))
            for i, (job, n) in enumerate(jobs)]


JOB_INSERT = ("INSERT INTO jobs (id, model, kind, state, priority, spec, batch_key, total, done, created_at) "
              "VALUES ({})")
CHUNK_COLUMNS = ("id", "job_id", "index", "model", "batch_key", "priority", "state", "items", "size", "attempts")
CHUNK_COLUMN_LIST = ", ".join(f'"{c}"' for c in CHUNK_COLUMNS)  # "index" is a keyword


def generate_postgres(url: str, total: int, job_rows: int) -> None:
    import psycopg

    engine = create_engine(url)
    pool = value_pool(engine.dialect)
    jobs = job_plan(total, job_rows)
    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        # Secondary indexes and constraints are built once after the load (faster than row by row); their
        # definitions are read from the migrated schema and put back exactly.
        cur.execute("SELECT indexdef, indexname FROM pg_indexes WHERE tablename = 'interpretations' AND indexname "
                    "NOT IN (SELECT conname FROM pg_constraint WHERE conrelid = 'interpretations'::regclass)")
        indexes = cur.fetchall()
        cur.execute("SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = "
                    "'interpretations'::regclass AND contype IN ('u', 'f')")
        constraints = cur.fetchall()
        for _, name in indexes:
            cur.execute(f'DROP INDEX "{name}"')
        for name, _ in constraints:
            cur.execute(f'ALTER TABLE interpretations DROP CONSTRAINT "{name}"')
        with cur.copy("COPY jobs (id, model, kind, state, priority, spec, batch_key, total, done, created_at) "
                      "FROM STDIN") as copy:
            for row in _job_rows(jobs):
                copy.write_row(row)
        chunks = []
        with cur.copy(f"COPY interpretations ({', '.join(COLUMNS)}) FROM STDIN") as copy:
            for what, row in row_stream(jobs, pool):
                if what == "row":
                    copy.write_row(row)
                else:
                    chunk_id, job, index, size = row
                    chunks.append((chunk_id, job, index, MODEL, "bench", 5, "done", "[]", size, 1))
        with cur.copy(f"COPY chunks ({CHUNK_COLUMN_LIST}) FROM STDIN") as copy:
            for row in chunks:
                copy.write_row(row)
        print(f"  rows copied in {time.perf_counter() - T0:.0f} s; building indexes and constraints", flush=True)
        for name, definition in constraints:
            cur.execute(f'ALTER TABLE interpretations ADD CONSTRAINT "{name}" {definition}')
        for definition, _ in indexes:
            cur.execute(definition)
        for table in ("interpretations", "chunks", "jobs"):
            cur.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))"
                        if table != "jobs" else "SELECT 1")
        conn.commit()
        conn.autocommit = True
        # What autovacuum does to a table after a load: statistics for the planner, the visibility map.
        cur.execute("VACUUM ANALYZE interpretations")
        cur.execute("VACUUM ANALYZE chunks")
        cur.execute("VACUUM ANALYZE jobs")
    engine.dispose()


def generate_sqlite(path: str, total: int, job_rows: int) -> None:
    import sqlite3

    engine = create_engine(f"sqlite:///{path}")
    pool = value_pool(engine.dialect)
    engine.dispose()
    jobs = job_plan(total, job_rows)
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("PRAGMA foreign_keys=OFF")
    indexes = conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = "
                           "'interpretations' AND sql IS NOT NULL").fetchall()
    for name, _ in indexes:
        conn.execute(f'DROP INDEX "{name}"')
    conn.executemany(JOB_INSERT.format(", ".join("?" * 10)),
                     [(*r[:-1], r[-1].isoformat(sep=" ")) for r in _job_rows(jobs)])
    insert_row = f"INSERT INTO interpretations ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
    insert_chunk = f"INSERT INTO chunks ({CHUNK_COLUMN_LIST}) VALUES ({', '.join('?' * 10)})"
    rows, chunks = [], []
    for what, row in row_stream(jobs, pool):
        if what == "row":
            rows.append((*row[:-1], row[-1].isoformat(sep=" ").replace("+00:00", "")))
            if len(rows) >= 100_000:
                conn.executemany(insert_row, rows)
                conn.executemany(insert_chunk, chunks)
                conn.commit()
                rows, chunks = [], []
        else:
            chunk_id, job, index, size = row
            chunks.append((chunk_id, job, index, MODEL, "bench", 5, "done", "[]", size, 1))
    conn.executemany(insert_row, rows)
    conn.executemany(insert_chunk, chunks)
    conn.commit()
    print(f"  rows inserted in {time.perf_counter() - T0:.0f} s; building indexes", flush=True)
    for _, sql in indexes:
        conn.execute(sql)
    conn.execute("ANALYZE")
    conn.commit()
    conn.close()


# --- measurement --------------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def timed(http, path: str, params: dict, repeats: int) -> tuple[list[float], list[float], dict]:
    """Wall times and this process's CPU times (the API's and the client's, every thread) of `repeats` requests."""
    times, cpu, body = [], [], None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        resp = http.get(path, params=params)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        assert resp.status_code == 200, (path, params, resp.status_code, resp.text[:300])
        body = resp.json()
    return times, cpu, body


def deep_cursor(http, path: str, params: dict, rows_before: int) -> str:
    """The cursor after `rows_before` rows, by walking the pages (1000 rows each) as a client would."""
    cursor, seen = None, 0
    while seen < rows_before:
        page = http.get(path, params={**params, "limit": min(1000, rows_before - seen),
                                      **({"cursor": cursor} if cursor else {})}).json()
        seen += len(page["items"])
        cursor = page["next_cursor"]
        assert cursor, f"{path} {params}: no cursor after {seen} rows"
    return cursor


class PeakRss:
    """The process's resident memory sampled every 20 ms while the block runs: peak growth over the start."""

    def __enter__(self):
        self.start = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.start) / 2**20


def stream_csv(http, path: str, params: dict) -> tuple[int, float, float, float]:
    """(data rows, seconds, CPU seconds of this process, peak RSS growth MiB) of one CSV download, read as it
    streams."""
    with PeakRss() as mem:
        t0, c0 = time.perf_counter(), time.process_time()
        lines = 0
        with http.stream("GET", path, params=params) as resp:
            assert resp.status_code == 200, resp.status_code
            tail = b""
            for block in resp.iter_bytes():
                lines += block.count(b"\n")
                tail = block[-1:] or tail
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return lines - 1, seconds, cpu, mem.growth_mib


def driver_csv_rate(url: str, job_rows: int) -> float:
    """Rows/s of the naive reference: the driver's cursor over the job's rows, csv.writer, no API."""
    engine = create_engine(url)
    columns = ", ".join(c for c in COLUMNS if c not in ("id", "job_id", "chunk_id", "engine_run_id"))
    t0 = time.perf_counter()
    n = 0
    with engine.connect() as conn:
        result = conn.execution_options(stream_results=True, yield_per=2000).execute(
            text(f"SELECT {columns} FROM interpretations WHERE job_id = :j"), {"j": TARGET_JOB})
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        for row in result:
            writer.writerow(row)
            n += 1
            if n % 2000 == 0:
                buffer.seek(0)
                buffer.truncate()
    seconds = time.perf_counter() - t0
    engine.dispose()
    assert n == job_rows, n
    return n / seconds


def measure(url: str, redis_url: str, job_rows: int, repeats: int) -> None:
    from fastapi.testclient import TestClient

    from api.main import create_app
    from selfie_jobs.settings import Settings

    class NoSender:
        def send_task(self, *args, **kwargs):
            raise RuntimeError("the benchmark submits nothing")

    settings = Settings(_env_file=None, database_url=url, redis_url=redis_url, auth_enabled=False)
    app = create_app(settings, task_sender=NoSender())
    results = f"/v1/jobs/{TARGET_JOB}/results"
    interp = f"/v1/jobs/{TARGET_JOB}/interpretations"
    deep = int(job_rows * 0.9)
    print(f"\n{'request (100 rows a page)':<58} {'p50 ms':>8} {'p95 ms':>8} {'CPU ms':>8}  rows")
    worst = 0.0
    with TestClient(app) as http:
        http.get(results, params={"limit": 100})  # the pool's first connection, the app's first request

        def report(name, path, params):
            nonlocal worst
            times, cpu, body = timed(http, path, params, repeats)
            p50, p95 = percentile(times, 0.5) * 1000, percentile(times, 0.95) * 1000
            worst = max(worst, p95)
            print(f"{name:<58} {p50:8.1f} {p95:8.1f} {statistics.median(cpu) * 1000:8.1f}  {len(body['items'])}",
                  flush=True)

        report("results: first page", results, {"limit": 100})
        report(f"results: page after {deep:,} rows (cursor)", results,
               {"limit": 100, "cursor": deep_cursor(http, results, {}, deep)})
        for sort in ("position", "relevancy", "-relevancy", "layer", "-layer", "token", "created"):
            report(f"interpretations sort={sort}: first page", interp, {"sort": sort, "limit": 100})
            report(f"interpretations sort={sort}: page after {deep:,} rows", interp,
                   {"sort": sort, "limit": 100, "cursor": deep_cursor(http, interp, {"sort": sort}, deep)})
        report("interpretations layer_min=layer_max=20", interp, {"layer_min": 20, "layer_max": 20, "limit": 100})
        report("interpretations layer 10..12, sort=-relevancy", interp,
               {"layer_min": 10, "layer_max": 12, "sort": "-relevancy", "limit": 100})
        report(f"interpretations q={ABSENT_WORD} (no row has it)", interp, {"q": ABSENT_WORD, "limit": 100})
        report(f"interpretations q={COMMON_WORD} (a third of the rows)", interp, {"q": COMMON_WORD, "limit": 100})
        report(f"interpretations q={COMMON_WORD}, sort=layer", interp,
               {"q": COMMON_WORD, "sort": "layer", "limit": 100})
        print(f"worst p95: {worst:.1f} ms (target < 100 ms)")

        reference = driver_csv_rate(url, job_rows)
        print(f"\n{'CSV export of the whole job':<44} {'rows/s':>8} {'rows/CPU-s':>11} {'peak RSS +MiB':>14}")
        for name, path, params in (("interpretations?format=csv", interp, {"format": "csv"}),
                                   ("results?format=csv", results, {"format": "csv"})):
            rows, seconds, cpu, growth = stream_csv(http, path, params)
            assert rows == job_rows, (name, rows)
            print(f"{name:<44} {rows / seconds:8.0f} {rows / cpu:11.0f} {growth:14.1f}   ({seconds:.2f} s, "
                  f"{rows / seconds / reference:.2f} of the driver alone)", flush=True)
        print(f"{'reference: driver cursor + csv.writer, no API':<44} {reference:8.0f}")


def main() -> None:
    global T0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", choices=("postgres", "sqlite"), default="postgres")
    parser.add_argument("--total", type=int, default=10_000_000, help="stored rows in all (default 10,000,000)")
    parser.add_argument("--job-rows", type=int, default=PROMPTS * LAYERS * TOKENS,
                        help="rows of the measured job (at most 100,000)")
    parser.add_argument("--repeats", type=int, default=30, help="requests per measured query")
    parser.add_argument("--postgres-admin", default=os.environ.get(
        "SELFIE_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"))
    parser.add_argument("--redis-url", default=os.environ.get("SELFIE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/5"))
    parser.add_argument("--fresh", action="store_true", help="generate the rows again")
    parser.add_argument("--drop", action="store_true", help="delete the generated database at the end")
    parser.add_argument("--generate-only", action="store_true")
    args = parser.parse_args()
    if not 0 < args.job_rows <= PROMPTS * LAYERS * TOKENS or args.total < args.job_rows:
        parser.error("--job-rows must be 1..100000 and at most --total")

    if args.db == "postgres":
        name = f"selfie_read_bench_{args.total}"
        admin = create_engine(args.postgres_admin, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            exists = conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}).first()
            if exists and args.fresh:
                conn.execute(text(f'DROP DATABASE "{name}"'))
            if not exists or args.fresh:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
        url = make_url(args.postgres_admin).set(database=name).render_as_string(hide_password=False)
    else:
        path = Path(f"/tmp/selfie-read-bench-{args.total}.db")
        exists = path.exists()
        if exists and args.fresh:
            for suffix in ("", "-wal", "-shm"):
                Path(str(path) + suffix).unlink(missing_ok=True)
        url = f"sqlite:///{path}"

    fresh = not exists or args.fresh
    if fresh:
        migrate.upgrade(url)
        print(f"generating {args.total:,} rows ({args.db}) ...", flush=True)
        T0 = time.perf_counter()
        if args.db == "postgres":
            generate_postgres(url, args.total, args.job_rows)
        else:
            generate_sqlite(str(path), args.total, args.job_rows)
        seconds = time.perf_counter() - T0
        print(f"generated {args.total:,} rows in {seconds:.0f} s ({args.total / seconds:,.0f} rows/s, with the "
              f"indexes and ANALYZE)")
    else:
        t0 = time.perf_counter()
        before = migrate.current_revision(url)
        migrate.upgrade(url)
        after = migrate.current_revision(url)
        if before != after:
            print(f"migrated the stored rows {before} -> {after} in {time.perf_counter() - t0:.0f} s")
            engine = create_engine(url)
            with engine.connect() as conn:
                conn.execute(text("ANALYZE interpretations" if args.db == "postgres" else "ANALYZE"))
                conn.commit()
            engine.dispose()
    engine = create_engine(url)
    with engine.connect() as conn:
        n = conn.execute(text("SELECT count(*) FROM interpretations WHERE job_id = :j"), {"j": TARGET_JOB}).scalar()
        if args.db == "postgres":
            size = conn.execute(text("SELECT pg_total_relation_size('interpretations'), "
                                     "pg_relation_size('interpretations'), reltuples FROM pg_class "
                                     "WHERE relname = 'interpretations'")).one()
            print(f"interpretations: ~{size[2]:,.0f} rows, {size[0] / 2**30:.2f} GiB with indexes "
                  f"(heap {size[1] / 2**30:.2f} GiB)")
            for index, nbytes in conn.execute(text(
                    "SELECT indexrelname, pg_relation_size(indexrelid) FROM pg_stat_user_indexes WHERE relname = "
                    "'interpretations' ORDER BY indexrelname")):
                print(f"  index {index}: {nbytes / 2**20:,.0f} MiB")
    engine.dispose()
    assert n == args.job_rows, f"the measured job has {n} rows, not {args.job_rows} (--fresh to generate again)"
    if not args.generate_only:
        print(f"load average {os.getloadavg()[0]:.1f} (2 shared cores)")
        measure(url, args.redis_url, args.job_rows, args.repeats)
    if args.drop:
        if args.db == "postgres":
            from selfie_jobs.db import get_engine

            get_engine.cache_clear()
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        else:
            for suffix in ("", "-wal", "-shm"):
                Path(str(path) + suffix).unlink(missing_ok=True)


T0 = 0.0

if __name__ == "__main__":
    main()
