"""Bytes per stored interpretation on PostgreSQL: relevancy as JSON text (schema 0006) against float32 bytes (0007),
measured with pg_total_relation_size on the same synthetic rows in two fresh databases of one run.

Rows as a worker writes them: an ~80-character text, `--tokens` generated tokens (token ids and relevancy values
as the engine makes them: doubles with 16-17 significant digits). After both, the 0006 database is migrated to
0007 in place (the migration's conversion, timed) and measured again. Also times reading every row's relevancy
back as lists of floats through SQLAlchemy from each database (JSON text against float32 bytes).

    .venv/bin/python benchmarks/row_size.py [--rows 20000] [--tokens 20] [--postgres-url URL]
"""

from __future__ import annotations

import argparse
import json
import random
import time
import uuid

import sqlalchemy as sa
from sqlalchemy.engine import make_url

from selfie_jobs import migrate
from selfie_jobs.float_arrays import Float32List

JOB_ID = "f" * 32


def create_database(admin_url: str) -> str:
    name = "selfie_rowsize_" + uuid.uuid4().hex[:10]
    engine = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def drop_database(admin_url: str, url: str) -> None:
    engine = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)'))
    engine.dispose()


def synthetic_rows(n: int, tokens: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = ["the", "city", "of", "Paris", "capital", "France", "tower", "river", "about", "a", "famous", "place"]
    rows = []
    for i in range(n):
        text = ""
        while len(text) < 80:
            text += rng.choice(words) + " "
        relevancy = [abs(rng.random() - rng.random()) ** 3 for _ in range(tokens)]
        rows.append({"id": i + 1, "job_id": JOB_ID, "prompt_index": i // 4000, "layer": (i // 200) % 20,
                     "token": i % 200, "source_token": "Paris", "text": text.strip(),
                     "token_ids": [rng.randrange(50_000) for _ in range(tokens)], "relevancy": relevancy,
                     "mean_relevancy": sum(relevancy) / tokens, "chunk_id": 1, "engine_run_id": uuid.uuid4().hex,
                     "worker": "worker-1@host:1234", "model": "smollm2-135m-instruct",
                     "created_at": "2026-11-30T12:00:00+00:00"})
    return rows


def fill(url: str, rows: list[dict], relevancy_type: sa.types.TypeEngine) -> None:
    table = sa.table("interpretations", *(sa.column(c) for c in rows[0] if c not in ("token_ids", "relevancy")),
                     sa.column("token_ids", sa.JSON()), sa.column("relevancy", relevancy_type))
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO jobs (id, model, state, priority, spec, batch_key, total, done, created_at) "
                             f"VALUES ('{JOB_ID}', 'm', 'succeeded', 5, '{{}}', 'k', {len(rows)}, {len(rows)}, "
                             "now())"))
        conn.execute(sa.text("INSERT INTO chunks (id, job_id, \"index\", model, batch_key, priority, state, items, "
                             f"size, attempts) VALUES (1, '{JOB_ID}', 0, 'm', 'k', 5, 'done', '[]', 1, 1)"))
        for start in range(0, len(rows), 2_000):
            conn.execute(sa.insert(table), rows[start : start + 2_000])
    engine.dispose()


def measure(url: str, n: int) -> dict[str, float]:
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text("VACUUM ANALYZE interpretations"))
        total, heap, indexes, relevancy = conn.execute(sa.text(
            "SELECT pg_total_relation_size('interpretations'), pg_relation_size('interpretations'), "
            "pg_indexes_size('interpretations'), (SELECT avg(pg_column_size(relevancy)) FROM interpretations)"
        )).one()
    engine.dispose()
    return {"total": total / n, "heap": heap / n, "indexes": indexes / n, "toast_etc": (total - heap - indexes) / n,
            "relevancy_column": float(relevancy)}


def read_rate(url: str, relevancy_type: sa.types.TypeEngine, n: int, repeats: int = 3) -> float:
    """Rows/s of reading every row's relevancy as lists of floats through SQLAlchemy (best of `repeats`)."""
    table = sa.table("interpretations", sa.column("relevancy", relevancy_type))
    engine = sa.create_engine(url)
    best = float("inf")
    with engine.connect() as conn:
        for _ in range(repeats):
            started = time.perf_counter()
            lists = conn.execute(sa.select(table.c.relevancy)).scalars().all()
            best = min(best, time.perf_counter() - started)
            assert len(lists) == n and isinstance(lists[0], list)
    engine.dispose()
    return n / best


def show(label: str, m: dict[str, float]) -> None:
    print(f"{label:<34} {m['total']:>8.0f} {m['heap']:>8.0f} {m['indexes']:>8.0f} {m['toast_etc']:>8.0f} "
          f"{m['relevancy_column']:>10.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--postgres-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    rows = synthetic_rows(args.rows, args.tokens)
    before_url, after_url = create_database(args.postgres_url), create_database(args.postgres_url)
    try:
        migrate.upgrade(before_url, "0006_job_kinds")
        fill(before_url, rows, sa.JSON())
        before = measure(before_url, args.rows)
        migrate.upgrade(after_url, "0007_compact_rows")
        fill(after_url, rows, Float32List())
        after = measure(after_url, args.rows)
        json_reads, float32_reads = read_rate(before_url, sa.JSON(), args.rows), read_rate(after_url, Float32List(),
                                                                                          args.rows)
        started = time.perf_counter()
        migrate.upgrade(before_url, "0007_compact_rows")
        convert_s = time.perf_counter() - started
        converted = measure(before_url, args.rows)
    finally:
        drop_database(args.postgres_url, before_url)
        drop_database(args.postgres_url, after_url)
    print(f"{args.rows} interpretations, {args.tokens} tokens each, ~80-character texts; bytes per row "
          "(pg_total_relation_size / rows)")
    print(f"{'':<34} {'total':>8} {'heap':>8} {'indexes':>8} {'toast+fsm':>8} {'relevancy':>10}")
    show("0006: relevancy as JSON text", before)
    show("0007: relevancy as float32 bytes", after)
    show("0006 migrated to 0007 in place", converted)
    print(f"after / before: {after['total'] / before['total']:.3f} "
          f"({before['total'] - after['total']:.0f} bytes less per row)")
    print(f"reading every row's relevancy as lists of floats: JSON {json_reads:,.0f} rows/s, float32 "
          f"{float32_reads:,.0f} rows/s ({float32_reads / json_reads:.2f}x)")
    print(f"migration 0006 -> 0007 converted {args.rows} rows in {convert_s:.1f} s "
          f"({args.rows / convert_s:,.0f} rows/s)")
    print(json.dumps({"before": before, "after": after, "converted": converted, "convert_s": convert_s,
                      "json_reads_per_s": json_reads, "float32_reads_per_s": float32_reads}))


if __name__ == "__main__":
    main()
