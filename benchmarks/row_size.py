"""Bytes per stored interpretation on PostgreSQL: relevancy as JSON text (schema 0006), as float32 bytes (0007 to
0014) and as a float4 array (`real[]`, 0015), measured with pg_total_relation_size on the same synthetic rows in
three fresh databases of one run.

Rows as a worker writes them: an ~80-character text, `--tokens` generated tokens (token ids and relevancy values
as the engine makes them: doubles with 16-17 significant digits). After all three, the 0006 database is migrated to
0015 in place (both conversions, timed) and measured again. Also times reading every row's relevancy back as lists
of floats through SQLAlchemy from each database.

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
from selfie_jobs.float_arrays import Float32List, pack_floats, unpack_floats

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


class Float32Bytes(sa.types.TypeDecorator):
    """Relevancy as migrations 0007 to 0014 stored it on PostgreSQL: little-endian float32 bytes in a BYTEA."""

    impl = sa.LargeBinary
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return pack_floats(value)

    def process_result_value(self, value, dialect):
        return unpack_floats(value)


#: (label, revision, the relevancy column's type at that revision)
FORMS = (("0006: relevancy as JSON text", "0006_job_kinds", sa.JSON()),
         ("0014: relevancy as float32 bytes", "0014_text_filter_index", Float32Bytes()),
         ("0015: relevancy as real[]", "0015_relevancy_arrays", Float32List()))


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
        each = dict(conn.execute(sa.text(
            "SELECT indexrelid::regclass::text, pg_relation_size(indexrelid) FROM pg_index "
            "WHERE indrelid = 'interpretations'::regclass ORDER BY 2 DESC")).all())
    engine.dispose()
    return {"total": total / n, "heap": heap / n, "indexes": indexes / n, "toast_etc": (total - heap - indexes) / n,
            "relevancy_column": float(relevancy), "each_index": {name: size / n for name, size in each.items()}}


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


def show(label: str, m: dict[str, float], reads_per_s: float | None) -> None:
    reads = "" if reads_per_s is None else f"{reads_per_s:>9,.0f}"
    print(f"{label:<34} {m['total']:>8.0f} {m['heap']:>8.0f} {m['indexes']:>8.0f} {m['toast_etc']:>8.0f} "
          f"{m['relevancy_column']:>10.1f} {reads}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--postgres-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    rows = synthetic_rows(args.rows, args.tokens)
    urls = [create_database(args.postgres_url) for _ in FORMS]
    try:
        sizes, reads = [], []
        for url, (_, revision, relevancy_type) in zip(urls, FORMS):
            migrate.upgrade(url, revision)
            fill(url, rows, relevancy_type)
            sizes.append(measure(url, args.rows))
            reads.append(read_rate(url, relevancy_type, args.rows))
        started = time.perf_counter()
        migrate.upgrade(urls[0], FORMS[-1][1])
        convert_s = time.perf_counter() - started
        converted = measure(urls[0], args.rows)
    finally:
        for url in urls:
            drop_database(args.postgres_url, url)
    print(f"{args.rows} interpretations, {args.tokens} tokens each, ~80-character texts; bytes per row "
          "(pg_total_relation_size / rows)")
    print(f"{'':<34} {'total':>8} {'heap':>8} {'indexes':>8} {'toast+fsm':>8} {'relevancy':>10} {'reads/s':>9}")
    for (label, _, _), size, rate in zip(FORMS, sizes, reads):
        show(label, size, rate)
    show("0006 migrated to 0015 in place", converted, None)
    print("bytes per row of each index, grown row by row at 0015 (and built by the migration in place):")
    for name, size in sizes[-1]["each_index"].items():
        print(f"  {name:<52} {size:>6.0f} ({converted['each_index'].get(name, 0):.0f})")
    first, last = sizes[0]["total"], sizes[-1]["total"]
    print(f"0015 / 0006: {last / first:.3f} ({last - first:+.0f} bytes per row); 0015 - 0014: "
          f"{last - sizes[1]['total']:+.0f} bytes per row")
    print(f"migration 0006 -> 0015 converted {args.rows} rows in {convert_s:.1f} s "
          f"({args.rows / convert_s:,.0f} rows/s)")
    print(json.dumps({"sizes": dict(zip((f[1] for f in FORMS), sizes)), "converted": converted,
                      "convert_s": convert_s, "reads_per_s": dict(zip((f[1] for f in FORMS), reads))}))


if __name__ == "__main__":
    main()
