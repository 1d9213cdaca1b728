"""Start a worker (one per GPU, model resident) or beat. The `selfie worker` / `selfie beat` commands call these.

`run_worker` pins the process to its GPUs (CUDA_VISIBLE_DEVICES, `workers.gpus`) before torch can initialise CUDA, hands the
model options to the pool child through the environment, and runs Celery's prefork pool: the parent holds
the broker connection and never loads the model; the child loads it once in `worker_process_init`. When the
child dies (SIGKILL, OOM killer, CUDA abort) the parent starts a new one, and the unacknowledged message is
redelivered (acks_late + reject_on_worker_lost).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from celery import Celery, signals

from selfie_jobs.queue import CONTROL_QUEUE, RECONCILE_TASK, model_queue
from selfie_jobs.settings import Settings, get_settings
from workers.gpus import pin_gpus
from workers.runtime import WorkerOptions

log = logging.getLogger(__name__)

#: Longest wait of a child whose model failed to load, before it exits and the parent starts the next try.
MAX_LOAD_BACKOFF_S = 300.0
#: Exit status of a worker that stopped because its model could not be loaded.
EXIT_LOAD_FAILED = 3


class LoadFailures:
    """Consecutive model-load failures of one worker, in a file: every try runs in a new pool child process."""

    def __init__(self, path: Path):
        self.path = path

    def read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {"failures": 0, "error": None}

    def record(self, error: str) -> int:
        failures = int(self.read()["failures"]) + 1
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"failures": failures, "error": error}))
        tmp.replace(self.path)
        return failures

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def default_node_name(model: str, gpus: int | Sequence[int] | None) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", model)
    if isinstance(gpus, int):
        gpus = (gpus,)
    where = "gpu" + "-".join(str(g) for g in gpus) if gpus else f"cpu{os.getpid()}"
    return f"selfie-{safe}-{where}@{socket.gethostname()}"


def install_worker_signals(app: Celery, settings: Settings, load_failures: LoadFailures) -> None:
    """Model load/unload in the pool child; a reconcile at start-up from the parent; the parent's shutdown made
    known to the children (a task running engine runs back to back stops at the end of its current one)."""
    # Made here, in the parent, before the pool forks its children: they inherit it. The parent sets it when a warm
    # or cold shutdown starts; Celery tells the children nothing until their tasks end.
    shutting_down = multiprocessing.get_context("fork").Event()

    @signals.worker_shutting_down.connect(weak=False, dispatch_uid="selfie.runtime.shutting_down")
    def _shutting_down(**_kwargs) -> None:
        shutting_down.set()

    @signals.worker_process_init.connect(weak=False, dispatch_uid="selfie.runtime.init")
    def _load_model(**_kwargs) -> None:
        from workers.runtime import start_runtime

        try:
            start_runtime(settings, shutting_down=shutting_down.is_set)
        except BaseException as exc:  # noqa: BLE001 - a child without its model must not take work
            failures = load_failures.record(f"{type(exc).__name__}: {exc}")
            if failures >= settings.worker_load_attempts:
                log.critical("the model could not be loaded (%d tries in a row); the worker stops", failures,
                             exc_info=True)
                logging.shutdown()
                os.kill(os.getppid(), signal.SIGTERM)  # the parent would otherwise start the next child
                os._exit(EXIT_LOAD_FAILED)
            delay = min(MAX_LOAD_BACKOFF_S, settings.worker_load_backoff_seconds * 2 ** (failures - 1))
            log.exception("the model could not be loaded (try %d of %d); this process exits and the next try "
                          "starts in %.0f s", failures, settings.worker_load_attempts, delay)
            logging.shutdown()
            time.sleep(delay)  # the parent restarts a child as soon as this one exits: no hot loop
            os._exit(EXIT_LOAD_FAILED)
        load_failures.clear()

    @signals.worker_process_shutdown.connect(weak=False, dispatch_uid="selfie.runtime.shutdown")
    def _unload_model(**_kwargs) -> None:
        from workers.runtime import stop_runtime

        stop_runtime("stopped")

    @signals.worker_ready.connect(weak=False, dispatch_uid="selfie.reconcile.at_start")
    def _reconcile_at_start(**_kwargs) -> None:
        # Whatever Redis lost while no worker ran (a restart, a flush) is found now, not at the next beat.
        try:
            app.send_task(RECONCILE_TASK, queue=CONTROL_QUEUE)
        except Exception:  # noqa: BLE001 - beat sends the next one
            log.exception("could not send the start-up reconcile")


def worker_argv(model: str, node_name: str, concurrency: int, loglevel: str, extra_args: Sequence[str]) -> list[str]:
    return [
        "worker",
        # prefork: the parent survives a child's death (SIGKILL, CUDA abort) and starts a fresh one.
        "--pool", "prefork",
        # one child per GPU by default: the model is resident once per child.
        "--concurrency", str(concurrency),
        # this model's queue and the control queue (reconcile, audits), nothing else.
        "--queues", f"{model_queue(model)},{CONTROL_QUEUE}",
        "--hostname", node_name,
        "--loglevel", loglevel,
        # no revokes by id and no broadcast state: start-up sync and gossip would only add traffic.
        "--without-mingle", "--without-gossip",
        *extra_args,
    ]


def run_worker(
    model: str,
    gpu: int | None = None,
    *,
    gpus: Sequence[int] | None = None,
    model_path: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    concurrency: int = 1,
    batch_size: int | None = None,
    loglevel: str = "INFO",
    hostname: str | None = None,
    settings: Settings | None = None,
    extra_args: Sequence[str] = (),
    inject_fault: str | None = None,
    cuda_graphs: bool = True,
    decode_attention: str = "sdpa",
    rms_norm: str = "model",
    threads: int | None = None,
) -> None:
    """Run a worker serving `model` until it is stopped (blocks). `gpu`: the CUDA device to pin to; `gpus`:
    several, over which the model is spread (`workers.gpus`)."""
    if gpu is not None and gpus:
        raise ValueError("give either gpu or gpus, not both")
    gpus = tuple(gpus) if gpus else ((gpu,) if gpu is not None else ())
    if len(gpus) > 1 and device is not None:
        raise ValueError("a model spread over several GPUs has no single device to name")
    pin_gpus(gpus)
    settings = settings or get_settings()
    node_name = hostname or default_node_name(model, gpus)
    options = WorkerOptions(model=model, model_path=model_path, device=device or ("cuda:0" if gpus else "cpu"),
                            dtype=dtype, node_name=node_name, batch_size=batch_size,
                            gpu=gpus[0] if len(gpus) == 1 else None, gpus=list(gpus) if len(gpus) > 1 else None,
                            inject_fault=inject_fault, cuda_graphs=cuda_graphs, decode_attention=decode_attention,
                            rms_norm=rms_norm, threads=threads)
    os.environ.update(options.to_env())
    from workers.celery_app import create_celery_app

    load_failures = LoadFailures(settings.data_dir / "workers" / f"{node_name}.load-failures.json")
    load_failures.clear()
    app = create_celery_app(settings, models=[model])
    install_worker_signals(app, settings, load_failures)
    try:
        app.worker_main(argv=worker_argv(model, node_name, concurrency, loglevel, extra_args))
    finally:
        failed = load_failures.read()
        if failed["failures"] >= settings.worker_load_attempts:
            print(f"selfie worker: model {model!r} could not be loaded ({failed['failures']} tries in a row): "
                  f"{failed['error']}", file=sys.stderr)
            raise SystemExit(EXIT_LOAD_FAILED)


def run_beat(settings: Settings | None = None, *, loglevel: str = "INFO", schedule_file: str | None = None) -> None:
    """Run Celery beat: reconcile every reconcile_interval_seconds (scheduled audits join the same schedule)."""
    settings = settings or get_settings()
    from workers.celery_app import create_celery_app

    app = create_celery_app(settings, register=False)
    schedule = schedule_file or app.conf.beat_schedule_filename
    os.makedirs(os.path.dirname(schedule) or ".", exist_ok=True)
    app.start(argv=["beat", "--loglevel", loglevel, "--schedule", schedule])
