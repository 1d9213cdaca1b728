"""SQLite writers of one process: the write gate (`selfie_jobs.db.WriteGate`) against the naive way (every writer
polls the file lock through SQLite's busy handler), in the same run, alternating rounds.

`--threads` writers (the API's thread pool: 40) each loop over a submit-shaped unit of work for `--seconds`: read,
then one transaction inserting a job row, a prompt row and a chunk row, then a second one stamping the chunk (the
enqueue step). A second process writes too, as a worker does (`--worker-writes-per-s` short transactions). Prints
units/s, latency p50/p99/max, errors and the worker's writes for each, and the ratio gate / naive.

    .venv/bin/python benchmarks/sqlite_write_bench.py [--threads 40] [--seconds 10] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import tempfile
import threading
import time
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.exc import SQLAlchemyError

from selfie_jobs.db import (
    MAX_OVERFLOW,
    POOL_SIZE,
    POOL_TIMEOUT_SECONDS,
    SQLITE_BUSY_TIMEOUT_MS,
    SQLITE_WRITE_WAIT_SECONDS,
    WriteGate,
    configure_sqlite,
)

SCHEMA = ["CREATE TABLE IF NOT EXISTS jobs (id INTEGER PRIMARY KEY, owner INTEGER, total INTEGER, payload TEXT)",
          "CREATE TABLE IF NOT EXISTS prompts (id INTEGER PRIMARY KEY, job INTEGER, text TEXT)",
          "CREATE TABLE IF NOT EXISTS chunks (id INTEGER PRIMARY KEY, job INTEGER, items TEXT, stamped REAL)",
          "CREATE INDEX IF NOT EXISTS ix_jobs_owner ON jobs (owner)"]


def engine_for(url: str, gated: bool):
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
                           pool_size=POOL_SIZE, max_overflow=MAX_OVERFLOW, pool_timeout=POOL_TIMEOUT_SECONDS)
    configure_sqlite(engine, WriteGate(SQLITE_WRITE_WAIT_SECONDS) if gated else None)
    return engine


def submit(engine, n: int) -> None:
    with engine.connect() as conn:
        conn.execute(text("SELECT coalesce(sum(total), 0) FROM jobs WHERE owner = :o"), {"o": n % 10}).scalar()
        job = conn.execute(text("INSERT INTO jobs (owner, total, payload) VALUES (:o, 2, :p) RETURNING id"),
                           {"o": n % 10, "p": "x" * 300}).scalar()
        conn.execute(text("INSERT INTO prompts (job, text) VALUES (:j, 'the cat sat on the mat')"), {"j": job})
        chunk = conn.execute(text("INSERT INTO chunks (job, items) VALUES (:j, '[[0,1,2]]') RETURNING id"),
                             {"j": job}).scalar()
        conn.commit()
        conn.execute(text("UPDATE chunks SET stamped = :t WHERE id = :c"), {"t": time.time(), "c": chunk})
        conn.commit()


def worker_process(url: str, per_s: float, seconds: float, out) -> None:
    """Another process's short write transactions (a worker claiming chunks and writing rows)."""
    engine = engine_for(url, gated=True)
    done = errors = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        t0 = time.monotonic()
        try:
            with engine.begin() as conn:
                conn.execute(text("UPDATE chunks SET stamped = stamped WHERE id IN (SELECT id FROM chunks "
                                  "ORDER BY id DESC LIMIT 4)"))
            done += 1
        except SQLAlchemyError:
            errors += 1
        time.sleep(max(0.0, 1 / per_s - (time.monotonic() - t0)))
    out.put((done, errors))


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


def run(url: str, gated: bool, threads: int, seconds: float, worker_per_s: float) -> dict:
    engine = engine_for(url, gated)
    latencies: list[float] = []
    errors: dict[str, int] = {}
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    out = multiprocessing.get_context("spawn").Queue()
    worker = multiprocessing.get_context("spawn").Process(target=worker_process, args=(url, worker_per_s, seconds, out))
    worker.start()

    def loop(n: int) -> None:
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            try:
                submit(engine, n)
            except SQLAlchemyError as exc:
                with lock:
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                continue
            with lock:
                latencies.append((time.perf_counter() - t0) * 1000)

    pool = [threading.Thread(target=loop, args=(n,)) for n in range(threads)]
    t0 = time.monotonic()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    wall = time.monotonic() - t0
    worker_done, worker_errors = out.get(timeout=60)
    worker.join()
    engine.dispose()
    return {"gate": gated, "units_per_s": round(len(latencies) / wall, 1), "p50_ms": round(percentile(latencies, 50), 1),
            "p99_ms": round(percentile(latencies, 99), 1), "max_ms": round(max(latencies, default=math.nan), 1),
            "errors": errors, "worker_writes": worker_done, "worker_errors": worker_errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--worker-writes-per-s", type=float, default=20.0)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'bench.db'}"
        with engine_for(url, gated=False).begin() as conn:
            for statement in SCHEMA:
                conn.execute(text(statement))
        for _ in range(args.rounds):
            for gated in (False, True):
                results.append(run(url, gated, args.threads, args.seconds, args.worker_writes_per_s))
                print(json.dumps(results[-1]), flush=True)
    naive = sum(r["units_per_s"] for r in results if not r["gate"])
    gate = sum(r["units_per_s"] for r in results if r["gate"])
    print(f"write gate / naive: {gate / naive:.2f}x units/s (threads {args.threads}, {args.rounds} rounds of "
          f"{args.seconds:.0f} s each)")


if __name__ == "__main__":
    main()
