"""Search across results (`selfie_jobs.search`) on many synthetic interpretations, against a plain
`LIKE '%word%'` scan with the same scope, filters, order and page size, measured in the same run.

Rows: `--rows` interpretations of `--jobs` jobs owned by 10 keys, each text 8-16 words drawn from a Zipf-like
vocabulary of 5,000 words (so a few words are in most rows and most words in few). Queries, as one of the 10 keys
(its own jobs only, as the API scopes them) and as an admin: single words from the common, middle and rare bands
of the vocabulary, and two-word phrases taken from stored texts. Each query reads the first page (50 rows, newest
first). Prints p50/p95/max per engine and the ratio.

    .venv/bin/python benchmarks/search_bench.py --db sqlite --rows 1000000
    .venv/bin/python benchmarks/search_bench.py --db postgres --rows 1000000
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import bindparam, false, select, text

from selfie_jobs.float_arrays import Float32List

VOCABULARY = 5000
KEYS = 10


def word(i: int) -> str:
    # pronounceable, distinct, and not a substring-heavy set: "w" + base-26 digits
    out = ""
    while True:
        out = chr(97 + i % 26) + out
        i //= 26
        if not i:
            return "w" + out


def zipf_weights(n: int) -> list[float]:
    return [1.0 / (r + 1) for r in range(n)]


def fill(url: str, rows: int, jobs: int, seed: int) -> list[str]:
    """Write the synthetic rows with plain bulk INSERTs (the triggers and indexes of the migration apply);
    returns a sample of stored texts for phrase queries."""
    from selfie_jobs.db import get_engine

    rng = random.Random(seed)
    words = [word(i) for i in range(VOCABULARY)]
    weights = zipf_weights(VOCABULARY)
    engine = get_engine(url)
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    per_job = rows // jobs
    samples: list[str] = []
    with engine.begin() as conn:
        for k in range(KEYS):
            conn.execute(text("INSERT INTO api_keys (id, name, prefix, key_hash, is_admin, created_at) "
                              "VALUES (:id, :n, :p, :h, false, :t)"),
                         {"id": k + 1, "n": f"k{k}", "p": f"p{k}", "h": f"{k:064d}", "t": start})
    for j in range(jobs):
        job_id = f"{j:032x}"
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO jobs (id, owner_key_id, model, kind, state, priority, spec, batch_key, "
                              "total, done, created_at) VALUES (:id, :o, :m, 'interpret', 'succeeded', 5, '{}', "
                              "'k', :n, :n, :t)"),
                         {"id": job_id, "o": j % KEYS + 1, "m": f"model{j % 3}", "n": per_job,
                          "t": start + timedelta(minutes=j)})
            chunk = conn.execute(text("INSERT INTO chunks (job_id, \"index\", model, batch_key, priority, state, "
                                      "items, size, attempts) VALUES (:id, 0, 'm', 'k', 5, 'done', '[]', 0, 0) "
                                      "RETURNING id"), {"id": job_id}).scalar_one()
            batch = []
            for i in range(per_job):
                body = " ".join(rng.choices(words, weights, k=rng.randint(8, 16)))
                if rng.random() < 0.001:
                    samples.append(body)
                batch.append({"job": job_id, "p": i // 100, "l": i % 31, "tk": i % 100, "text": body,
                              "c": chunk, "m": f"model{j % 3}", "t": start + timedelta(minutes=j, seconds=i)})
            insert = text("INSERT INTO interpretations (job_id, prompt_index, layer, token, source_token, text, "
                          "token_ids, relevancy, mean_relevancy, chunk_id, engine_run_id, worker, model, "
                          "created_at) VALUES (:job, :p, :l, :tk, 'x', :text, '[]', :rel, 0.5, :c, 'r', "
                          "'w', :m, :t)").bindparams(bindparam("rel", type_=Float32List()))  # [] as the column holds it
            conn.execute(insert, [{**row, "rel": []} for row in batch])
        if (j + 1) % max(1, jobs // 10) == 0:
            print(f"  {(j + 1) * per_job:,} rows written", flush=True)
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            conn.execute(text("ANALYZE"))
    return samples


def like_page(session, who, q: str, limit: int = 50):
    """The naive search: every word as LIKE '%word%' (case-insensitive), the same scope, order and page."""
    from selfie_jobs.models import Interpretation, Job

    query = select(Interpretation).join(Job, Job.id == Interpretation.job_id)
    for part in q.replace('"', "").split():
        query = query.where(Interpretation.text.ilike(f"%{part}%"))
    if not who.is_admin:
        query = query.where(Job.owner_key_id == who.key_id) if who.key_id is not None else query.where(false())
    return session.scalars(query.order_by(Interpretation.id.desc()).limit(limit)).all()


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def main() -> None:
    from selfie_jobs.auth import Principal
    from selfie_jobs.db import get_sessionmaker
    from selfie_jobs.migrate import upgrade
    from selfie_jobs.search import search

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=20, help="queries per band")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--postgres-admin", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()

    tmp = tempfile.TemporaryDirectory()
    if args.db == "sqlite":
        url = f"sqlite:///{Path(tmp.name) / 'search.db'}"
        drop = None
    else:
        from sqlalchemy import create_engine

        name = f"selfie_search_bench_{args.rows}"
        admin = create_engine(args.postgres_admin, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        url = args.postgres_admin.rsplit("/", 1)[0] + "/" + name

        def drop():
            from selfie_jobs.db import get_engine

            get_engine(url).dispose()
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
    try:
        upgrade(url)
        began = time.perf_counter()
        samples = fill(url, args.rows, args.jobs, args.seed)
        print(f"{args.rows:,} rows written in {time.perf_counter() - began:.0f} s ({args.db})")
        rng = random.Random(args.seed + 1)
        bands = {
            "common word (rank 1-20)": [word(rng.randrange(0, 20)) for _ in range(args.queries)],
            "middle word (rank 200-1000)": [word(rng.randrange(200, 1000)) for _ in range(args.queries)],
            "rare word (rank 4000-5000)": [word(rng.randrange(4000, VOCABULARY)) for _ in range(args.queries)],
            "two-word phrase": [],
        }
        for body in samples:
            parts = body.split()
            i = rng.randrange(len(parts) - 1)
            bands["two-word phrase"].append(f'"{parts[i]} {parts[i + 1]}"')
        bands["two-word phrase"] = bands["two-word phrase"][: args.queries]
        sessions = get_sessionmaker(url)
        results = []
        for who_name, who in (("one key", Principal(key_id=3, is_admin=False)),
                              ("admin", Principal(key_id=None, is_admin=True))):
            for band, queries in bands.items():
                fts, like = [], []
                for q in queries:
                    with sessions() as s:  # alternate, so load on the machine hits both alike
                        t = time.perf_counter()
                        got = search(s, who, q, limit=50).rows
                        fts.append(time.perf_counter() - t)
                        t = time.perf_counter()
                        naive = like_page(s, who, q)
                        like.append(time.perf_counter() - t)
                    # every FTS hit holds the words, so LIKE finds at least as many (it also matches inside words)
                    assert len(naive) >= len(got), q
                results.append((who_name, band, fts, like))
                print(f"{who_name:8s} {band:30s} search p50 {1000 * statistics.median(fts):7.1f} ms  "
                      f"p95 {1000 * percentile(fts, 95):7.1f} ms  max {1000 * max(fts):7.1f} ms   |  "
                      f"LIKE p50 {1000 * statistics.median(like):8.1f} ms  p95 {1000 * percentile(like, 95):8.1f} ms"
                      f"   p95 ratio {percentile(like, 95) / percentile(fts, 95):6.1f}x", flush=True)
        every_fts = [v for *_, fts, _ in results for v in fts]
        every_like = [v for *_, like in results for v in like]
        print(f"all queries ({len(every_fts)}): search p95 {1000 * percentile(every_fts, 95):.1f} ms, "
              f"LIKE p95 {1000 * percentile(every_like, 95):.1f} ms")
    finally:
        if drop is not None:
            drop()
        tmp.cleanup()


if __name__ == "__main__":
    main()
