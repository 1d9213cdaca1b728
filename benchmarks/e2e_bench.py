"""End-to-end benchmark: the same interpretations through API + Redis + worker + database, and through the
in-process engine, in one run.

    python benchmarks/e2e_bench.py                         # SmolLM2-135M-Instruct on the CPU, SQLite
    python benchmarks/e2e_bench.py --database postgres     # PostgreSQL (the local server) instead of SQLite
    python benchmarks/e2e_bench.py --tiny                  # a tiny random LLaMA: a quick check of the script
    python benchmarks/e2e_bench.py --kind vectors          # 1,000 vectors (10 jobs of 100) instead of prompts

What runs: one worker process (`python -m workers worker`, the model resident), one API process
(`uvicorn api.main:create_app --factory`), Redis (local, else embedded) and the database. `--clients` concurrent
clients (asyncio, httpx) submit `--jobs` jobs of one prompt each (`--layers` x the last `--last-tokens` tokens,
`--max-new-tokens`, greedy, the model's default template, the same engine settings for every job so the worker
batches across jobs); this process then polls the database until every job is finished.

Reported: service interpretations/s (first submit -> last job finished), the submit latency p50/p99 seen by the
clients while the worker runs, then the engine's interpretations/s on exactly the same requests in this process
(`SelfieEngine.interpret`, same batch size, after the worker was stopped so both had the machine alone), and the
ratio service/engine (the goal is >= 0.9: the queue and the database cost under a tenth of the engine time).
`--rounds` repeats both measurements alternately and reports the best of each.

`--kind vectors`: `--vectors` random vectors of the model's hidden size (seeded, scaled to the norm of a typical
hidden state) are submitted as `--jobs` jobs (default 10) through the client's `.npy` upload
(`Client.submit_vectors`), against `SelfieEngine.interpret_vectors` on the same vectors in this process.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SMOLLM2 = "smollm2-135m-instruct"
SUBJECTS = ("The Eiffel Tower", "My neighbour's cat", "The central bank", "A quiet library", "The old lighthouse",
            "Our football team", "The new vaccine", "A violin concerto", "The mountain road", "The chess engine")
PREDICATES = ("is located in Paris.", "sleeps all afternoon.", "raised interest rates again.",
              "opens at nine every morning.", "guided ships for a century.", "won the final last night.",
              "passed its last clinical trial.", "was played in Vienna.", "closes when it snows.",
              "beat the world champion.")


def make_prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice(SUBJECTS)} {rng.choice(PREDICATES)}" for _ in range(n)]


def broker(tmp: Path):
    from tests import services

    url = os.environ.get("SELFIE_REDIS_URL") or "redis://127.0.0.1:6379/13"
    if services.redis_answers(url):
        import redis

        redis.Redis.from_url(url).flushdb()
        return url, None
    from workers.embedded import start_embedded_redis

    server = start_embedded_redis(tmp)
    return server.url, server


def database(kind: str, tmp: Path):
    from tests import services

    if kind == "postgres":
        admin = services.postgres_admin_url()
        if admin is None:
            raise SystemExit("no PostgreSQL server answers at " + services.LOCAL_POSTGRES)
        return services.create_postgres_database(admin), admin
    return f"sqlite:///{tmp / 'bench.db'}", None


def service_round(args, tmp: Path, model: str, model_path: Path | None, prompts: list[str]) -> dict:
    from sqlalchemy import func, select

    from selfie_jobs.db import get_engine, session_scope
    from selfie_jobs.migrate import upgrade
    from selfie_jobs.models import Interpretation, Job
    from tests import services
    from tests.load.loadsupport import ServiceStack, run_load, wait_jobs_finished

    db_url, admin = database(args.database, tmp)
    redis_url, embedded = broker(tmp)
    upgrade(db_url)
    env = {}
    env["SELFIE_MAX_BATCH_INTERPRETATIONS"] = str(args.max_batch)
    queue = list(enumerate(prompts))
    layers = [int(v) for v in args.layers.split(",")]

    def body(_client: int, _i: int) -> dict:
        n, prompt = queue.pop(0)
        return {"prompts": [prompt], "targets": {"layers": layers, "tokens": {"start": -args.last_tokens}},
                "max_new_tokens": args.max_new_tokens, "idempotency_key": f"bench-{n}-{uuid.uuid4().hex[:6]}"}

    try:
        with ServiceStack(tmp, db_url, redis_url, model, model_path=model_path, batch_size=args.batch_size,
                          threads=args.threads, env=env) as stack:
            ready_s = stack.wait_ready(900)
            t0 = time.monotonic()
            load = run_load(stack.url, body, submitters=args.clients, seconds=3600, max_requests=len(prompts),
                            timeout_s=120)
            submitted_s = time.monotonic() - t0
            states = wait_jobs_finished(db_url, args.timeout, poll=0.2)
            wall = time.monotonic() - t0
            with session_scope(db_url) as s:
                rows = s.scalar(select(func.count()).select_from(Interpretation))
                jobs = s.scalar(select(func.count()).select_from(Job))
    finally:
        get_engine.cache_clear()
        if admin is not None:
            services.drop_postgres_database(admin, db_url)
        if embedded is not None:
            embedded.stop()
    summary = load.summary()
    bad = {k: v for k, v in summary["statuses"].items() if k not in ("200", "202")}
    if bad or summary["transport_errors"] or states != {"succeeded": jobs} or jobs != len(prompts):
        raise RuntimeError(f"the service run failed: {summary} states={states} jobs={jobs}; logs in {tmp}")
    return {"worker_ready_s": round(ready_s, 1), "jobs": jobs, "interpretations": rows,
            "submit_phase_s": round(submitted_s, 2), "wall_s": round(wall, 2),
            "service_interp_per_s": round(rows / wall, 2), "submit_latency_ms": summary["submit_latency_ms"],
            "submits": summary["statuses"]}


def make_vectors(n: int, hidden: int, seed: int = 0):
    """Seeded random vectors with the norm of a typical mid-layer state of SmolLM2 (about 30)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, hidden)).astype(np.float32)
    return vectors * (30.0 / np.sqrt(hidden))


def vectors_service_round(args, tmp: Path, model: str, model_path: Path | None, vectors) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    from sqlalchemy import func, select

    from selfie_client import Client
    from selfie_jobs.db import get_engine, session_scope
    from selfie_jobs.migrate import upgrade
    from selfie_jobs.models import Job, VectorInterpretation
    from tests import services
    from tests.load.loadsupport import ServiceStack, wait_jobs_finished

    db_url, admin = database(args.database, tmp)
    redis_url, embedded = broker(tmp)
    upgrade(db_url)
    env = {}
    env["SELFIE_MAX_BATCH_INTERPRETATIONS"] = str(args.max_batch)
    env["SELFIE_CHUNK_SIZE"] = str(args.chunk_size)
    parts = [vectors[i::args.jobs] for i in range(args.jobs)]
    try:
        with ServiceStack(tmp, db_url, redis_url, model, model_path=model_path, batch_size=args.batch_size,
                          threads=args.threads, env=env) as stack:
            ready_s = stack.wait_ready(900)
            t0 = time.monotonic()

            def submit(part):
                with Client(stack.url) as client:
                    started = time.monotonic()
                    client.submit_vectors(part, max_new_tokens=args.max_new_tokens)
                    return time.monotonic() - started

            with ThreadPoolExecutor(max(1, min(args.clients, args.jobs))) as pool:
                latencies = sorted(pool.map(submit, parts))
            submitted_s = time.monotonic() - t0
            states = wait_jobs_finished(db_url, args.timeout, poll=0.2)
            wall = time.monotonic() - t0
            with session_scope(db_url) as s:
                rows = s.scalar(select(func.count()).select_from(VectorInterpretation))
                jobs = s.scalar(select(func.count()).select_from(Job))
    finally:
        get_engine.cache_clear()
        if admin is not None:
            services.drop_postgres_database(admin, db_url)
        if embedded is not None:
            embedded.stop()
    if states != {"succeeded": jobs} or jobs != args.jobs:
        raise RuntimeError(f"the service run failed: states={states} jobs={jobs}; logs in {tmp}")
    ms = [round(1000 * x, 1) for x in latencies]
    return {"worker_ready_s": round(ready_s, 1), "jobs": jobs, "interpretations": rows,
            "submit_phase_s": round(submitted_s, 2), "wall_s": round(wall, 2),
            "service_interp_per_s": round(rows / wall, 2),
            "submit_latency_ms": {"p50": ms[len(ms) // 2], "p99": ms[min(len(ms) - 1, int(len(ms) * 0.99))]},
            "submits": {"202": jobs}}


def vectors_engine_round(engine, args, vectors) -> dict:
    from selfie_core import GenerationConfig, InjectionConfig, InterpretationTemplate

    template = InterpretationTemplate.preset("summarize", engine.tokenizer)
    generation = GenerationConfig(max_new_tokens=args.max_new_tokens)
    engine.interpret_vectors(list(vectors[:4]), template, InjectionConfig(k=1), generation)  # warm
    t0 = time.monotonic()
    out = engine.interpret_vectors(list(vectors), template, InjectionConfig(k=1), generation,
                                   batch_size=args.batch_size)
    wall = time.monotonic() - t0
    return {"interpretations": len(out), "wall_s": round(wall, 2), "engine_interp_per_s": round(len(out) / wall, 2)}


def engine_round(engine, args, prompts: list[str]) -> dict:
    from selfie_core import GenerationConfig, InjectionConfig, InterpretationTemplate, InterpretRequest

    layers = [int(v) for v in args.layers.split(",")]
    requests = []
    for p, text in enumerate(prompts):
        n = len(engine.tokenizer(text).input_ids)
        requests += [InterpretRequest(text, layer, t, key=(p, layer, t))
                     for layer in layers for t in range(max(0, n - args.last_tokens), n)]
    template = InterpretationTemplate.preset("summarize", engine.tokenizer)
    generation = GenerationConfig(max_new_tokens=args.max_new_tokens)
    engine.interpret(requests[:4], template=template, injection=InjectionConfig(k=1), generation=generation)  # warm
    t0 = time.monotonic()
    out = engine.interpret(requests, template=template, injection=InjectionConfig(k=1), generation=generation,
                           batch_size=args.batch_size)
    wall = time.monotonic() - t0
    return {"interpretations": len(out), "wall_s": round(wall, 2), "engine_interp_per_s": round(len(out) / wall, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny random LLaMA instead of SmolLM2 (script check)")
    ap.add_argument("--database", choices=["sqlite", "postgres"], default="sqlite")
    ap.add_argument("--kind", choices=["interpret", "vectors"], default="interpret",
                    help="the job kind: prompts' hidden states, or your own vectors")
    ap.add_argument("--vectors", type=int, default=1000, help="vectors in all with --kind vectors (default 1000)")
    ap.add_argument("--chunk-size", type=int, default=64, help="items per chunk of the service (default 64)")
    ap.add_argument("--jobs", type=int, default=None, help="jobs (default: 100 of one prompt each; 10 with "
                                                           "--kind vectors)")
    ap.add_argument("--clients", type=int, default=50, help="concurrent submitting clients (default 50)")
    ap.add_argument("--layers", default="4,12,20,28", help="hidden_states indices per prompt")
    ap.add_argument("--last-tokens", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=None, help="engine batch size (worker and reference)")
    ap.add_argument("--max-batch", type=int, default=256, help="largest cross-job batch of the worker")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of the worker and of the reference (default: the worker's own default, "
                         "selfie_core.threads.default_threads(), on both sides)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=3600.0)
    ap.add_argument("--json", dest="json_out", default=None, help="also write the results here")
    args = ap.parse_args(argv)

    args.jobs = args.jobs or (10 if args.kind == "vectors" else 100)
    tmp = Path(tempfile.mkdtemp(prefix="selfie-e2e-bench-"))
    if args.tiny:
        from tests.integration.worker_support import MODEL, NUM_LAYERS, save_tiny_model

        model, model_path = MODEL, save_tiny_model(tmp / MODEL)
        args.layers = ",".join(str(v) for v in range(NUM_LAYERS + 1)) if args.layers == ap.get_default("layers") \
            else args.layers
    else:
        model, model_path = SMOLLM2, None
    prompts = make_prompts(args.jobs)
    result: dict = {"model": model, "kind": args.kind, "database": args.database, "jobs": args.jobs, "clients": args.clients,
                    "layers": args.layers, "last_tokens": args.last_tokens, "max_new_tokens": args.max_new_tokens,
                    "cpus": os.cpu_count(), "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
                    "rounds": []}

    import torch

    from selfie_core import SelfieEngine, load_model

    from selfie_core.threads import default_threads, set_threads

    # Both sides run the same thread count: the worker gets it as --threads, this process sets it here.
    args.threads = args.threads or default_threads()
    result["threads"] = set_threads(args.threads)
    vectors = None
    if args.kind == "vectors":
        hidden = 32 if args.tiny else 576  # the tiny LLaMA's and SmolLM2-135M's hidden sizes
        vectors = make_vectors(args.vectors, hidden)
        result["vectors"] = args.vectors
    engine = None
    for r in range(args.rounds):
        round_dir = tmp / f"round{r}"
        round_dir.mkdir()
        if vectors is not None:  # the engine is not loaded meanwhile
            service = vectors_service_round(args, round_dir, model, model_path, vectors)
        else:
            service = service_round(args, round_dir, model, model_path, prompts)
        print("service:", json.dumps(service), flush=True)
        if engine is None:
            engine = SelfieEngine(load_model(str(model_path) if model_path else model, device="cpu"))
        reference = (vectors_engine_round(engine, args, vectors) if vectors is not None
                     else engine_round(engine, args, prompts))
        print("engine: ", json.dumps(reference), flush=True)
        if reference["interpretations"] != service["interpretations"]:
            raise RuntimeError(f"different workloads: {reference} vs {service}")
        result["rounds"].append({"service": service, "engine": reference})
        if r + 1 < args.rounds:
            engine = None  # free the memory: the next worker gets the machine alone
    best_service = max(x["service"]["service_interp_per_s"] for x in result["rounds"])
    best_engine = max(x["engine"]["engine_interp_per_s"] for x in result["rounds"])
    last = result["rounds"][-1]["service"]
    result.update(
        interpretations=last["interpretations"],
        service_interp_per_s=best_service,
        engine_interp_per_s=best_engine,
        service_over_engine=round(best_service / best_engine, 3),
        submit_latency_ms=last["submit_latency_ms"],
        load_average_after=[round(x, 2) for x in os.getloadavg()],
    )
    print(json.dumps(result, indent=1))
    print(f"service/engine = {result['service_over_engine']:.3f} (goal >= 0.9); submit latency p50 "
          f"{last['submit_latency_ms']['p50']} ms, p99 {last['submit_latency_ms']['p99']} ms with {args.clients} "
          "concurrent clients")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
