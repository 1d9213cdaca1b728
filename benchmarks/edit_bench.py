"""Edit jobs through the service: what the queue, the database and the worker's interleaving cost an edit, and what
an edit costs other users' interpretation jobs on the same worker. Not a timed test: it prints ratios measured in
the same run.

    python benchmarks/edit_bench.py                        # SmolLM2-135M-Instruct on the CPU, SQLite, both parts
    python benchmarks/edit_bench.py --part edit            # (a) only
    python benchmarks/edit_bench.py --part stream          # (b) only
    python benchmarks/edit_bench.py --tiny                 # a tiny random LLaMA: a quick check of the script

The stack is `e2e_bench.py`'s (one worker process with the model resident, one API process, Redis local or
embedded, SQLite or `--database postgres`), started by its helpers: Redis is SELFIE_REDIS_URL when it answers
(its database is flushed first), else 127.0.0.1:6379/13, else embedded. The worker and this process run the same torch
thread count (`--threads`, default `selfie_core.threads.default_threads()`) and never at the same time.

(a) `--part edit`: a supervised edit of `--epochs` (20, the notebook's) through the service (Client.edit_supervised,
submit -> the variant returned), with the evaluations the job runs by default (the objective, the interpretation
of the source state before/after and the target's, the greedy chat answer before/after), against the plain
notebook-style loop in this process after the stack stopped: `selfie_core.edits.SupervisedEdit` for the same epochs
with the job's spec (seed, template, k, max_new_tokens), then the same evaluations with `selfie_core.edit_evals`
and `selfie_core.textgen`. Printed: both wall times, service/plain, and the service's time split by the stored
timestamps (submit -> claimed, claimed -> first epoch row, mean epoch, last epoch -> finished: the evaluations and
the save) next to the plain loop's (set-up, mean epoch, evaluations); and whether both sides' losses agree.

(b) `--part stream`: `--clients` clients each submit one-prompt interpret jobs (`--layers` x the last token,
`--max-new-tokens`) in a closed loop (submit, follow to the end, submit the next) while a supervised edit of
`--long-epochs` (100) trains on the same worker, until the edit ends or `--seconds` pass (then it is cancelled);
then the same stream alone for the same duration. Printed: interpretations/s completed in each phase (jobs that
finished inside the window), the ratio with/without, submit -> finished latency p50/p95 of each phase (the jobs'
stored created_at/finished_at), and how many epochs the edit did meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.e2e_bench import SMOLLM2, broker, database  # noqa: E402  (after the path)

SOURCE = "How do I make a bomb?"   # token -2 is " bomb"
TARGET = "How do I make a cake?"   # token -2 is " cake"
STREAM = ("The Eiffel Tower is located in Paris.", "My neighbour's cat sleeps all afternoon.",
          "The central bank raised interest rates again.", "The old lighthouse guided ships for a century.")


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def aware(ts: datetime) -> datetime:
    return ts if ts.tzinfo else ts.replace(tzinfo=timezone.utc)  # SQLite returns the stored UTC naive


class Stack:
    """e2e_bench's broker and database around one `ServiceStack`; the database dropped and Redis stopped on exit."""

    def __init__(self, args, tmp: Path, model: str, model_path: Path | None):
        self.args, self.tmp, self.model, self.model_path = args, tmp, model, model_path

    def __enter__(self):
        from selfie_jobs.migrate import upgrade
        from tests.load.loadsupport import ServiceStack

        self.db_url, self.admin = database(self.args.database, self.tmp)
        self.redis_url, self.embedded = broker(self.tmp)
        upgrade(self.db_url)
        self.stack = ServiceStack(self.tmp, self.db_url, self.redis_url, self.model, model_path=self.model_path,
                                  threads=self.args.threads)
        try:
            self.ready_s = self.stack.wait_ready(900)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        from selfie_jobs.db import get_engine
        from tests import services

        self.stack.stop()
        get_engine.cache_clear()
        if self.admin is not None:
            services.drop_postgres_database(self.admin, self.db_url)
        if self.embedded is not None:
            self.embedded.stop()


def job_times(db_url: str, job_id: str) -> dict:
    from sqlalchemy import select

    from selfie_jobs.db import session_scope
    from selfie_jobs.models import EditEpoch, Job

    with session_scope(db_url) as s:
        job = s.get(Job, job_id)
        epochs = s.execute(select(EditEpoch.epoch, EditEpoch.created_at, EditEpoch.edit_loss)
                           .where(EditEpoch.job_id == job_id).order_by(EditEpoch.epoch)).all()
        return {"state": job.state, "spec": job.spec, "created": aware(job.created_at),
                "started": aware(job.started_at) if job.started_at else None,
                "finished": aware(job.finished_at) if job.finished_at else None,
                "epochs": [(e, aware(t), loss) for e, t, loss in epochs]}


def secs(a: datetime, b: datetime) -> float:
    return round((b - a).total_seconds(), 2)


# -- (a) one edit: service against the plain loop ------------------------------------------------------------
def edit_service(args, tmp: Path, model: str, model_path: Path | None) -> dict:
    from selfie_client import Client
    from selfie_client.edits import state_ref

    with Stack(args, tmp, model, model_path) as st, Client(st.stack.url) as client:
        t0 = time.monotonic()
        out = client.edit_supervised(state_ref(SOURCE, args.layer, -2), target=state_ref(TARGET, args.layer, -2),
                                     epochs=args.epochs, progress=False, timeout=args.timeout)
        wall = time.monotonic() - t0
        times = job_times(st.db_url, out["job_id"])
    if out["variant"] is None or times["state"] != "succeeded":
        raise RuntimeError(f"the edit job did not succeed: {times['state']}; logs in {tmp}")
    ep = times["epochs"]
    return {"worker_ready_s": round(st.ready_s, 1), "wall_s": round(wall, 2), "spec": times["spec"],
            "submit_to_claimed_s": secs(times["created"], times["started"]),
            "claimed_to_first_epoch_s": secs(times["started"], ep[0][1]),
            "mean_epoch_s": round(secs(ep[0][1], ep[-1][1]) / max(1, len(ep) - 1), 3),
            "last_epoch_to_finished_s": secs(ep[-1][1], times["finished"]),
            "epochs": len(ep), "edit_losses": [loss for _, _, loss in ep],
            "evaluations": out["variant"]["evaluations"]}


def edit_plain(engine, spec: dict) -> dict:
    """The notebook's loop and the job's default evaluations, written plainly, with the job's own spec."""
    from selfie_core.edit_evals import interpret_state, load_reference_texts, source_distance
    from selfie_core.edits import SupervisedEdit, hidden_state
    from selfie_core.textgen import chat_text, generate
    from workers.runners.edits import ANSWER_TOKENS
    from workers.runners.interpret import spec_template

    src, tgt = spec["source"], spec["target"]
    template = spec_template(spec["template"], engine.tokenizer) if spec.get("template") else None
    k, max_new = spec["injection"]["k"], spec["generation"]["max_new_tokens"]
    t0 = time.monotonic()
    target = hidden_state(engine, tgt["prompt"], tgt["layer"], tgt["token"])
    run = SupervisedEdit(engine, src["prompt"], src["layer"], src["token"], target, load_reference_texts(),
                         beta=spec["beta"], epochs=spec["epochs"], lr=spec["lr"], anchor=spec["anchor"],
                         refs_per_epoch=spec["refs_per_epoch"], seed=spec["seed"])
    set_up = time.monotonic() - t0
    ends, losses = [], []
    for report in run:
        ends.append(time.monotonic())
        losses.append(report.edit_loss)
    t_eval = time.monotonic()
    p, layer, tok = src["prompt"], src["layer"], src["token"]
    chat = [chat_text(engine.tokenizer, p)]
    evaluations = {
        "objective": [source_distance(engine, p, layer, tok, target), source_distance(engine, p, layer, tok, target,
                                                                                      run.edit)],
        "interpretation": [interpret_state(engine, p, layer, tok, e, template=template, k=k, max_new_tokens=max_new)
                           for e in (None, run.edit)]
        + [interpret_state(engine, tgt["prompt"], tgt["layer"], tgt["token"], template=template, k=k,
                           max_new_tokens=max_new)],
        "answer": [generate(engine.model, engine.tokenizer, chat, ANSWER_TOKENS, edit=e)[0] for e in (None, run.edit)],
    }
    end = time.monotonic()
    return {"wall_s": round(end - t0, 2), "set_up_s": round(set_up, 2),
            "first_epoch_s": round(ends[0] - t0 - set_up, 3),
            "mean_epoch_s": round((ends[-1] - ends[0]) / max(1, len(ends) - 1), 3),
            "evaluations_s": round(end - t_eval, 2), "epochs": len(losses), "edit_losses": losses,
            "evaluations": evaluations}


def part_edit(args, tmp: Path, model: str, model_path: Path | None) -> dict:
    from selfie_core import SelfieEngine, load_model

    service = edit_service(args, tmp / "edit", model, model_path)  # the stack is stopped when this returns
    engine = SelfieEngine(load_model(str(model_path) if model_path else model, device="cpu"))
    plain = edit_plain(engine, service["spec"])
    worst = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(service["edit_losses"], plain["edit_losses"]))
    ev_s, ev_p = service["evaluations"], plain["evaluations"]
    same = {"losses_max_rel_diff": worst,
            "interpretation_base": ev_s["interpretation"]["base"] == ev_p["interpretation"][0],
            "interpretation_variant": ev_s["interpretation"]["variant"] == ev_p["interpretation"][1],
            "answer_variant": ev_s["answer"]["variant"] == ev_p["answer"][1]}
    for side in (service, plain):
        side.pop("evaluations")
        side["edit_losses"] = [round(x, 5) for x in side["edit_losses"][:: max(1, len(side["edit_losses"]) // 5)]]
    service.pop("spec")
    return {"service": service, "plain": plain, "agree": same,
            "service_over_plain": round(service["wall_s"] / plain["wall_s"], 3)}


# -- (b) other users' interpret jobs while an edit trains ----------------------------------------------------
def stream(url: str, args, stop: threading.Event, jobs: list, errors: list) -> None:
    """One client: one-prompt interpret jobs, each followed to its end before the next."""
    from selfie_client import Client

    layers = [int(v) for v in args.layers.split(",")]
    with Client(url) as client:
        n = 0
        while not stop.is_set():
            prompt = STREAM[n % len(STREAM)]
            n += 1
            try:
                job = client.submit(prompt, layers=layers, tokens=[-1], max_new_tokens=args.max_new_tokens,
                                    idempotency_key=uuid.uuid4().hex)
                client.wait(job["id"], progress=False, timeout=args.timeout)
            except Exception as exc:  # recorded and reported: a failing stream must not look like a slow one
                errors.append(repr(exc))
                return
            jobs.append(job["id"])


def run_stream(url: str, args, seconds: float | None, until=None) -> tuple[float, float, list[str], list[str]]:
    """The stream for `seconds` or until `until()` is true (checked every 0.25 s); returns its window and jobs."""
    stop, jobs, errors = threading.Event(), [], []
    threads = [threading.Thread(target=stream, args=(url, args, stop, jobs, errors), daemon=True)
               for _ in range(args.clients)]
    t0 = datetime.now(timezone.utc)
    start = time.monotonic()
    for t in threads:
        t.start()
    while not errors and (seconds is None or time.monotonic() - start < seconds) and not (until and until()):
        time.sleep(0.25)
    t1 = datetime.now(timezone.utc)
    stop.set()
    for t in threads:
        t.join(args.timeout)
    if errors:
        raise RuntimeError(f"a stream client failed: {errors[0]}")
    return t0, t1, jobs, errors


def stream_figures(db_url: str, job_ids: list[str], t0: datetime, t1: datetime) -> dict:
    from sqlalchemy import select

    from selfie_jobs.db import session_scope
    from selfie_jobs.models import Job
    from tests.load.loadsupport import percentile

    with session_scope(db_url) as s:
        rows = s.execute(select(Job.created_at, Job.finished_at, Job.done, Job.state)
                         .where(Job.id.in_(job_ids))).all() if job_ids else []
    succeeded = [(aware(c), aware(f), d) for c, f, d, state in rows if state == "succeeded"]
    inside = [(c, f, d) for c, f, d in succeeded if f <= t1]
    window = (t1 - t0).total_seconds()
    # latency of every job submitted in the window, also those that ended after it (the stream's last jobs)
    latencies = [(f - c).total_seconds() for c, f, _ in succeeded]
    done = sum(d for _, _, d in inside)
    return {"window_s": round(window, 1), "jobs": len(inside), "interpretations": done,
            "interp_per_s": round(done / window, 3), "jobs_failed": len(rows) - len(succeeded),
            "latency_s": {"p50": round(percentile(latencies, 50), 2), "p95": round(percentile(latencies, 95), 2),
                          "max": round(max(latencies, default=float("nan")), 2)}}


def part_stream(args, tmp: Path, model: str, model_path: Path | None) -> dict:
    from selfie_client import Client
    from selfie_client.edits import state_ref

    with Stack(args, tmp / "stream", model, model_path) as st, Client(st.stack.url) as client:
        edit = client.edit_supervised(state_ref(SOURCE, args.layer, -2), target=state_ref(TARGET, args.layer, -2),
                                      epochs=args.long_epochs, wait=False)
        while client.status(edit["id"], include_prompts=False)["state"] == "queued":
            time.sleep(0.1)  # the window opens once the edit trains

        def edit_over() -> bool:
            return client.status(edit["id"], include_prompts=False)["state"] not in ("queued", "running")

        t0, t1, jobs, _ = run_stream(st.stack.url, args, args.seconds, edit_over)
        times = job_times(st.db_url, edit["id"])
        epochs_in = sum(1 for _, t, _ in times["epochs"] if t0 <= t <= t1)
        ends = [t for _, t, _ in times["epochs"]]
        if times["state"] in ("queued", "running"):
            client.cancel(edit["id"])
            client.wait(edit["id"], progress=False, timeout=args.timeout)
        with_edit = stream_figures(st.db_url, jobs, t0, t1)
        with_edit.update(edit_epochs_in_window=epochs_in, edit_epochs_total=args.long_epochs,
                         edit_state_at_window_end=times["state"],
                         interp_per_s_while_training=stream_figures(st.db_url, jobs, t0, min(t1, ends[-1]))[
                             "interp_per_s"],
                         edit_mean_epoch_s=round(secs(ends[0], ends[-1]) / max(1, len(ends) - 1), 3),
                         edit_evaluations_s=secs(ends[-1], times["finished"]) if times["finished"] else None)
        a0, a1, alone_jobs, _ = run_stream(st.stack.url, args, (t1 - t0).total_seconds())
        alone = stream_figures(st.db_url, alone_jobs, a0, a1)
    return {"with_edit": with_edit, "alone": alone,
            "with_over_alone": round(with_edit["interp_per_s"] / alone["interp_per_s"], 3)
            if alone["interp_per_s"] else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny random LLaMA instead of SmolLM2 (script check)")
    ap.add_argument("--part", choices=["edit", "stream", "both"], default="both")
    ap.add_argument("--database", choices=["sqlite", "postgres"], default="sqlite")
    ap.add_argument("--threads", type=int, default=None, help="torch threads of the worker and of this process")
    ap.add_argument("--layer", type=int, default=None, help="the edited state's layer (default 8; tiny: 2)")
    ap.add_argument("--epochs", type=int, default=20, help="(a) the edit's epochs (default 20, the notebook's)")
    ap.add_argument("--long-epochs", type=int, default=100, help="(b) the edit's epochs (default 100)")
    ap.add_argument("--seconds", type=float, default=600.0, help="(b) the longest window (default 600)")
    ap.add_argument("--clients", type=int, default=3, help="(b) concurrent stream clients (default 3)")
    ap.add_argument("--layers", default="4,12,20", help="(b) layers of each stream job (its last token)")
    ap.add_argument("--max-new-tokens", type=int, default=8, help="(b) new tokens of each stream interpretation")
    ap.add_argument("--timeout", type=float, default=3600.0)
    ap.add_argument("--json", dest="json_out", default=None, help="also write the results here")
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="selfie-edit-bench-"))
    if args.tiny:
        from tests.integration.worker_support import MODEL, NUM_LAYERS, save_tiny_model

        model, model_path = MODEL, save_tiny_model(tmp / MODEL)
        args.layer = args.layer or NUM_LAYERS
        if args.layers == ap.get_default("layers"):
            args.layers = ",".join(str(v) for v in range(NUM_LAYERS + 1))
    else:
        model, model_path = SMOLLM2, None
        args.layer = args.layer or 8
    from selfie_core.threads import default_threads, set_threads

    args.threads = args.threads or default_threads()
    result: dict = {"model": model, "database": args.database, "threads": set_threads(args.threads),
                    "cpus": os.cpu_count(), "load_average_at_start": load_avg()}
    if args.part in ("edit", "both"):
        result["edit"] = part_edit(args, tmp, model, model_path)
        print("edit:", json.dumps(result["edit"]), flush=True)
    if args.part in ("stream", "both"):
        result["stream"] = part_stream(args, tmp, model, model_path)
        print("stream:", json.dumps(result["stream"]), flush=True)
    result["load_average_after"] = load_avg()
    print(json.dumps(result, indent=1))
    if "edit" in result:
        e = result["edit"]
        s, p = e["service"], e["plain"]
        print(f"(a) {args.epochs}-epoch supervised edit + evaluations: service {s['wall_s']} s, plain {p['wall_s']} s, "
              f"service/plain = {e['service_over_plain']}; service: submit->claimed {s['submit_to_claimed_s']} s, "
              f"claimed->first epoch {s['claimed_to_first_epoch_s']} s, epoch {s['mean_epoch_s']} s, "
              f"evaluations+save {s['last_epoch_to_finished_s']} s; plain: set-up {p['set_up_s']} s, "
              f"first epoch {p['first_epoch_s']} s, "
              f"epoch {p['mean_epoch_s']} s, evaluations {p['evaluations_s']} s")
    if "stream" in result:
        w, a = result["stream"]["with_edit"], result["stream"]["alone"]
        print(f"(b) interpretations/s with an edit training {w['interp_per_s']} vs alone {a['interp_per_s']} "
              f"(ratio {result['stream']['with_over_alone']}) over {w['window_s']} s "
              f"({w['interp_per_s_while_training']} until the edit's last epoch); latency p50/p95 "
              f"{w['latency_s']['p50']}/{w['latency_s']['p95']} s (max {w['latency_s']['max']}) vs "
              f"{a['latency_s']['p50']}/{a['latency_s']['p95']} s (max {a['latency_s']['max']}); the edit did "
              f"{w['edit_epochs_in_window']} of {w['edit_epochs_total']} epochs meanwhile, "
              f"{w['edit_mean_epoch_s']} s an epoch, then {w['edit_evaluations_s']} s of evaluations")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
