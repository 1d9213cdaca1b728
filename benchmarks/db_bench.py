"""The worker's database cycle, against references measured in the same run.

`write`: the project's write path (`chunks.complete_chunk`: rows inserted with ON CONFLICT DO NOTHING, the chunk
marked done, the job's progress, one transaction per chunk) against a plain DB-API `executemany` of the same rows
(the same INSERT .. ON CONFLICT DO NOTHING, JSON and float32 bytes encoded in the loop, one commit per chunk), with 1 and 2 writer
processes writing into ONE job (the case that used to serialise on the job's row), alternating rounds.

`cycle`: the whole worker cycle (`workers.tasks.run_chunk`: claim the chunk and companions, load inputs, record the
engine run, run it, write through the writer thread, finish) with an engine that answers at once, in N processes
that each take every Nth chunk's message, as Celery hands them out.

`rate`: the same cycle with an engine that produces rows at a fixed rate (it sleeps, as a process waiting on a GPU
does): the rate the service delivers over the engine's nominal rate (`ratio`) and over the rate the same engine
reaches alone in the same process just before, with no service around it (`ratio_to_engine_alone`: a loaded machine
oversleeps); 1.0: the database is wholly hidden behind compute.

Rows are synthetic and shaped like real ones: text of about 80 characters, 20 relevancy floats and token ids.

    .venv/bin/python benchmarks/db_bench.py write --db sqlite postgres --writers 1 2
    .venv/bin/python benchmarks/db_bench.py cycle --db postgres --processes 2
    .venv/bin/python benchmarks/db_bench.py rate --db postgres --rate 2000

PostgreSQL: the local server (tests/services.py: 127.0.0.1:5432, trust auth); a fresh database per run, dropped after.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RELEVANCY = 20
TEXT = "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France."[:80]


# --------------------------------------------------------------------------------------------------------------
# databases and jobs
# --------------------------------------------------------------------------------------------------------------


class Database:
    def __init__(self, backend: str):
        from selfie_jobs.migrate import upgrade

        self.backend = backend
        self._tmp = None
        if backend == "sqlite":
            self._tmp = tempfile.TemporaryDirectory()
            self.url = f"sqlite:///{self._tmp.name}/bench.db"
        else:
            from tests import services

            self.admin = services.postgres_admin_url()
            if self.admin is None:
                raise SystemExit("no PostgreSQL answers at 127.0.0.1:5432")
            self.url = services.create_postgres_database(self.admin)
        upgrade(self.url)

    def close(self) -> None:
        from selfie_jobs.db import get_engine

        get_engine(self.url).dispose()
        if self._tmp is not None:
            self._tmp.cleanup()
        else:
            from tests import services

            services.drop_postgres_database(self.admin, self.url)


def make_job(url: str, rows: int, chunk: int, batch_key: str = "bench") -> tuple[str, list[int]]:
    """A job of `rows` interpret items in chunks of `chunk`, queued; returns (job id, chunk ids in order)."""
    from sqlalchemy import select

    from selfie_jobs.db import get_sessionmaker
    from selfie_jobs.models import Chunk
    from tests.unit.jobs.factories import make_job as factory_job

    items = [(0, i // 1000, i % 1000) for i in range(rows)]
    with get_sessionmaker(url)() as s, s.begin():
        job = factory_job(s, prompts=("the cat sat on the mat",), items=items, chunk_size=chunk, batch_key=batch_key)
        ids = list(s.scalars(select(Chunk.id).where(Chunk.job_id == job.id).order_by(Chunk.index)))
        return job.id, ids


@dataclass
class Result:
    """An engine result as the runners hand it to the batcher."""

    key: tuple[int, ...]
    source_token: str = "Paris"
    text: str = TEXT
    token_ids: list[int] = field(default_factory=lambda: list(range(100, 100 + RELEVANCY)))
    relevancy: list[float] = field(default_factory=lambda: [0.01 * i for i in range(RELEVANCY)])
    mean_relevancy: float = 0.095


# --------------------------------------------------------------------------------------------------------------
# write: the project's write path against a plain executemany
# --------------------------------------------------------------------------------------------------------------


def _write_project(url: str, job_id: str, chunk_ids: Sequence[int], start, out) -> None:
    from sqlalchemy import select

    from selfie_jobs import chunks as C
    from selfie_jobs.db import get_sessionmaker
    from selfie_jobs.kinds import get_kind
    from selfie_jobs.models import Chunk

    sessions = get_sessionmaker(url)
    owner = f"bench-{multiprocessing.current_process().pid}"
    kind = get_kind("interpret")
    with sessions() as s, s.begin():
        for chunk_id in chunk_ids:
            C.claim_chunk(s, chunk_id, owner, 600)
        items = {c: s.scalar(select(Chunk.items).where(Chunk.id == c)) for c in chunk_ids}
    rows = {c: [kind.row_from(Result((c, *item))) for item in items[c]] for c in chunk_ids}
    start.wait()
    began = time.perf_counter()
    for chunk_id in chunk_ids:
        C.complete_chunk(sessions, chunk_id, owner, rows[chunk_id], engine_run_id="bench", worker=owner,
                         model="tiny")
    out.put(time.perf_counter() - began)


def _write_executemany(url: str, job_id: str, chunk_ids: Sequence[int], start, out) -> None:
    from sqlalchemy import ARRAY, select
    from sqlalchemy.types import TypeDecorator

    from selfie_jobs.db import get_engine, get_sessionmaker
    from selfie_jobs.models import Chunk, Interpretation

    try:
        from selfie_jobs.float_arrays import pack_floats
    except ImportError:  # the code before compact rows: relevancy is JSON text
        pack_floats = None

    with get_sessionmaker(url)() as s:
        items = {c: s.scalar(select(Chunk.items).where(Chunk.id == c)) for c in chunk_ids}
    engine = get_engine(url)
    mark = "%s" if engine.dialect.name == "postgresql" else "?"
    columns = ("job_id, prompt_index, layer, token, source_token, text, token_ids, relevancy, mean_relevancy, "
               "chunk_id, engine_run_id, worker, model, created_at")
    sql = (f"INSERT INTO interpretations ({columns}) VALUES ({', '.join([mark] * 14)}) "
           "ON CONFLICT (job_id, prompt_index, layer, token) DO NOTHING")
    # the relevancy column as the driver takes it, encoded in the loop: JSON text before migration 0007, float32
    # bytes on SQLite since, a float array on PostgreSQL since 0015 (real[])
    relevancy_type = Interpretation.__table__.c.relevancy.type
    if not isinstance(relevancy_type, TypeDecorator):
        relevancy_column = json.dumps
    elif isinstance(relevancy_type.dialect_impl(engine.dialect).impl_instance, ARRAY):
        relevancy_column = list
    else:
        relevancy_column = pack_floats
    conn = engine.raw_connection()
    results = {c: [Result((c, *item)) for item in items[c]] for c in chunk_ids}
    start.wait()
    began = time.perf_counter()
    for chunk_id in chunk_ids:
        now = time.strftime("%Y-%m-%d %H:%M:%S")
        params = [(job_id, r.key[1], r.key[2], r.key[3], r.source_token, r.text, json.dumps(r.token_ids),
                   relevancy_column(r.relevancy), r.mean_relevancy, chunk_id, "bench", "w", "tiny", now)
                  for r in results[chunk_id]]
        cursor = conn.cursor()
        cursor.executemany(sql, params)
        cursor.close()
        conn.commit()
    out.put(time.perf_counter() - began)
    conn.close()


def _processes(target, url: str, job_id: str, chunk_ids: list[int], n: int) -> float:
    """Run `target` in `n` processes over every nth chunk, started together; the slowest one's seconds."""
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=target, args=(url, job_id, chunk_ids[i::n], start, out)) for i in range(n)]
    for p in procs:
        p.start()
    reports = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode:
            raise SystemExit(f"a benchmark process failed (exit {p.exitcode})")
    return max(r[0] if isinstance(r, tuple) else r for r in reports)


def bench_write(backend: str, writers: int, rows: int, chunk: int, rounds: int) -> dict[str, Any]:
    db = Database(backend)
    try:
        rates: dict[str, list[float]] = {"project": [], "executemany": []}
        for _ in range(rounds):
            for name, target in (("project", _write_project), ("executemany", _write_executemany)):
                job_id, chunk_ids = make_job(db.url, rows, chunk)
                seconds = _processes(target, db.url, job_id, chunk_ids, writers)
                rates[name].append(rows / seconds)
        best = {name: max(values) for name, values in rates.items()}
        return {"bench": "write", "db": backend, "writers": writers, "rows": rows, "chunk": chunk,
                "project_rows_s": round(best["project"]), "executemany_rows_s": round(best["executemany"]),
                "ratio": round(best["project"] / best["executemany"], 3),
                "rounds": {k: [round(v) for v in vs] for k, vs in rates.items()}}
    finally:
        db.close()


# --------------------------------------------------------------------------------------------------------------
# cycle and rate: workers.tasks.run_chunk with a fake engine
# --------------------------------------------------------------------------------------------------------------


@dataclass
class FakeEngine:
    """A runner (workers.batcher.Runner) whose engine batches of `batch` items take `batch / rate` seconds (0: none)."""

    batch: int
    rate: float = 0.0
    busy_seconds: float = 0.0

    def validate(self, items, spec) -> None:
        pass

    def stream(self, items, spec) -> Iterator[list[Any]]:
        for start in range(0, len(items), self.batch):
            part = items[start : start + self.batch]
            if self.rate:
                began = time.perf_counter()
                time.sleep(len(part) / self.rate)  # a process waiting on its GPU: the GIL is free
                self.busy_seconds += time.perf_counter() - began
            yield [Result(i.key) for i in part]

    def is_input_error(self, exc) -> bool:
        return False

    def is_out_of_memory(self, exc) -> bool:
        return False

    def is_device_failure(self, exc) -> bool:
        return False

    def free_memory(self) -> None:
        pass


@dataclass
class FakeRuntime:
    """What `run_chunk` reads of a worker's runtime, with the fake engine resident."""

    settings: Any
    identity: Any
    sessions: Any
    engine: FakeEngine
    options: Any = None
    held_ids: set[int] = field(default_factory=set)
    finished_ids: set[int] = field(default_factory=set)
    rows: int = 0
    overlap: Any = None  # workers.overlap.Overlap, as Runtime has

    def shutting_down(self) -> bool:
        return False

    @property
    def name(self) -> str:
        return self.identity.name

    @property
    def model(self) -> str:
        return self.identity.model

    def hold(self, ids, jobs=None) -> None:
        self.held_ids.update(ids)

    def unhold(self, ids) -> None:
        self.held_ids.difference_update(ids)

    def held(self) -> list[int]:
        return sorted(self.held_ids)

    def finished(self, ids) -> None:
        self.finished_ids.update(ids)

    def has_finished(self, chunk_id: int) -> bool:
        return chunk_id in self.finished_ids

    def runner_for(self, kind: str) -> FakeEngine:
        return self.engine

    def served(self, rows: int) -> None:
        self.rows += rows


def _cycle(url: str, job_id: str, chunk_ids: Sequence[int], start, out, *, batch: int, rate: float,
           max_batch: int) -> None:
    import logging
    from types import SimpleNamespace

    from selfie_jobs import cards
    from selfie_jobs.db import get_sessionmaker
    from selfie_jobs.retry import unit_of_work
    from selfie_jobs.settings import Settings
    from workers.tasks import run_chunk

    logging.basicConfig(level=logging.WARNING)
    settings = Settings(_env_file=None, database_url=url, max_batch_interpretations=max_batch, lease_seconds=600)
    sessions = get_sessionmaker(url)
    identity = cards.worker_identity("bench@localhost", "tiny", "cpu")
    unit_of_work(sessions, lambda s: cards.heartbeat(s, identity, state="ready", info={}))
    from workers.overlap import Overlap

    runtime = FakeRuntime(settings, identity, sessions, FakeEngine(batch, rate),
                          options=SimpleNamespace(inject_fault=None), overlap=Overlap())
    alone = 0.0
    if rate:  # the reference: the same engine producing the same rows with no service around it, in this process
        items = [SimpleNamespace(key=(0, i)) for i in range(runtime.engine.batch * 8)]
        began = time.perf_counter()
        for _ in FakeEngine(batch, rate).stream(items, {}):
            pass
        alone = len(items) / (time.perf_counter() - began)
    start.wait()
    began = time.perf_counter()
    for chunk_id in chunk_ids:  # the messages Celery hands this process, run as its task runs them
        run_chunk(runtime, chunk_id, wait=False)
    runtime.overlap.drain()  # the last run's rows committed
    out.put((time.perf_counter() - began, runtime.rows, runtime.engine.busy_seconds, alone))


def _cycle_default(url, job_id, chunk_ids, start, out):
    _cycle(url, job_id, chunk_ids, start, out, batch=64, rate=0.0, max_batch=256)


def bench_cycle(backend: str, processes: int, rows: int, chunk: int) -> dict[str, Any]:
    from sqlalchemy import select

    from selfie_jobs.db import get_sessionmaker
    from selfie_jobs.models import Job

    db = Database(backend)
    try:
        job_id, chunk_ids = make_job(db.url, rows, chunk)
        seconds = _processes(_cycle_default, db.url, job_id, chunk_ids, processes)
        with get_sessionmaker(db.url)() as s:
            job = s.get(Job, job_id)
            state, done = job.state, job.done
        assert (state, done) == ("succeeded", rows), (state, done)
        return {"bench": "cycle", "db": backend, "processes": processes, "rows": rows, "chunk": chunk,
                "rows_s": round(rows / seconds)}
    finally:
        db.close()


def bench_rate(backend: str, rate: float, rows: int, chunk: int, batch: int, max_batch: int) -> dict[str, Any]:
    from selfie_jobs.db import get_sessionmaker
    from selfie_jobs.models import Job

    db = Database(backend)
    try:
        job_id, chunk_ids = make_job(db.url, rows, chunk)
        ctx = multiprocessing.get_context("spawn")
        start, out = ctx.Barrier(1), ctx.Queue()

        proc = ctx.Process(target=_rate_cycle, args=(db.url, job_id, chunk_ids, start, out, batch, rate, max_batch))
        proc.start()
        seconds, served, busy, alone = out.get(timeout=600)
        proc.join()
        with get_sessionmaker(db.url)() as s:
            job = s.get(Job, job_id)
            assert (job.state, job.done) == ("succeeded", rows), (job.state, job.done)
        delivered = rows / seconds
        return {"bench": "rate", "db": backend, "engine_rows_s": rate, "rows": rows, "chunk": chunk,
                "engine_batch": batch, "max_batch": max_batch, "delivered_rows_s": round(delivered),
                "ratio": round(delivered / rate, 3), "engine_alone_rows_s": round(alone),
                "ratio_to_engine_alone": round(delivered / alone, 3), "engine_busy_s": round(busy, 2),
                "wall_s": round(seconds, 2)}
    finally:
        db.close()


def _rate_cycle(url, job_id, chunk_ids, start, out, batch, rate, max_batch):
    _cycle(url, job_id, chunk_ids, start, out, batch=batch, rate=rate, max_batch=max_batch)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="bench", required=True)
    w = sub.add_parser("write")
    w.add_argument("--db", nargs="+", default=["sqlite", "postgres"], choices=["sqlite", "postgres"])
    w.add_argument("--writers", nargs="+", type=int, default=[1, 2])
    w.add_argument("--rows", type=int, default=6400)
    w.add_argument("--chunk", type=int, default=64)
    w.add_argument("--rounds", type=int, default=2)
    c = sub.add_parser("cycle")
    c.add_argument("--db", nargs="+", default=["postgres"], choices=["sqlite", "postgres"])
    c.add_argument("--processes", type=int, default=2)
    c.add_argument("--rows", type=int, default=12800)
    c.add_argument("--chunk", type=int, default=64)
    r = sub.add_parser("rate")
    r.add_argument("--db", nargs="+", default=["postgres"], choices=["sqlite", "postgres"])
    r.add_argument("--rate", type=float, default=2000.0)
    r.add_argument("--rows", type=int, default=8192)
    r.add_argument("--chunk", type=int, default=64)
    r.add_argument("--batch", type=int, default=64, help="items per engine batch")
    r.add_argument("--max-batch", type=int, default=512, help="items per engine run (max_batch_interpretations)")
    args = parser.parse_args(argv)
    for backend in args.db:
        if args.bench == "write":
            for writers in args.writers:
                print(json.dumps(bench_write(backend, writers, args.rows, args.chunk, args.rounds)), flush=True)
        elif args.bench == "cycle":
            print(json.dumps(bench_cycle(backend, args.processes, args.rows, args.chunk)), flush=True)
        else:
            print(json.dumps(bench_rate(backend, args.rate, args.rows, args.chunk, args.batch, args.max_batch)),
                  flush=True)


if __name__ == "__main__":
    main()
