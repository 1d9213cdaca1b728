"""The resident model of a worker process: loaded once in `worker_process_init` (never at import), warmed up,
its card written to `served_models`, and a heartbeat thread that keeps the `workers` row and the leases fresh.

Options come from the launcher through SELFIE_WORKER_* environment variables (the pool child inherits them),
so the child needs nothing from the parent but its environment.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from selfie_jobs import cards
from selfie_jobs import chunks as chunk_ops
from selfie_jobs.retry import unit_of_work
from selfie_jobs.settings import Settings
from selfie_jobs.queries import closed_jobs
from workers.overlap import Overlap
from workers.progress import BatchWatch
from workers.runners import EngineRunner, build_runners  # noqa: F401 - EngineRunner: the interpret runner

log = logging.getLogger(__name__)

ENV_PREFIX = "SELFIE_WORKER_"
WARMUP_PROMPT = "Hello"



@dataclass
class WorkerOptions:
    """What one worker serves and how: the launcher's flags, carried to the pool child by the environment."""

    model: str
    model_path: str | None = None
    device: str = "cpu"
    dtype: str | None = None  # None: the model catalogue's dtype for this model, else float32
    node_name: str = "selfie@localhost"
    batch_size: int | None = None
    gpu: int | None = None
    gpus: list[int] | None = None  # several GPUs (visible as cuda:0..n-1) over which the model is spread
    cuda_graphs: bool = True  # on CUDA, decode steps as CUDA graphs (SelfieEngine(cuda_graphs=...))
    decode_attention: str = "sdpa"  # how those steps attend (SelfieEngine(decode_attention=...))
    rms_norm: str = "model"  # the model's RMSNorm modules or the engine's Triton kernel (SelfieEngine(rms_norm=...))
    threads: int | None = None  # torch CPU threads (None: selfie_core.threads.default_threads())
    inject_fault: str | None = None  # tests only: see workers.faults

    @property
    def devices(self) -> list[str]:
        """The devices this worker computes on."""
        return [f"cuda:{i}" for i in range(len(self.gpus))] if self.gpus else [self.device]

    @property
    def device_label(self) -> str:
        """The devices as the `workers` row's device column holds them (64 characters at most)."""
        label = ",".join(self.devices)
        return label if len(label) <= 64 else f"cuda:0..{len(self.devices) - 1}"

    def to_env(self) -> dict[str, str]:
        return {ENV_PREFIX + k.upper(): json.dumps(v) for k, v in asdict(self).items()}

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> WorkerOptions:
        environ = dict(os.environ if environ is None else environ)
        values = {}
        for name in cls.__dataclass_fields__:
            raw = environ.get(ENV_PREFIX + name.upper())
            if raw is not None:
                values[name] = json.loads(raw)
        if "model" not in values:
            raise RuntimeError(f"{ENV_PREFIX}MODEL is not set: start workers with workers.launch.run_worker")
        return cls(**values)


#: How many chunks a worker process remembers having finished (a few thousand engine runs' companions).
FINISHED_REMEMBERED = 10_000


@dataclass
class Runtime:
    settings: Settings
    options: WorkerOptions
    sessions: Callable[[], Session]
    identity: cards.WorkerIdentity | None = None
    engine: Any = None
    runner: Any = None  # the interpret kind's runner
    runners: dict[str, Any] = field(default_factory=dict)  # job kind -> runner over the resident engine
    variants: Any = None  # workers.variants.VariantCache: the variants served lately, kept in memory
    batches_served: int = 0
    rows_served: int = 0
    loaded_in_s: float = 0.0
    source: str | None = None  # the folder or hub id the weights came from (None: the built-in model by name)
    dtype: str | None = None  # the dtype the model was loaded in
    threads: int | None = None  # torch's CPU threads in this process, once start() has set them
    state: str = "loading"  # what the heartbeat reports: "loading" until start() has the model resident, then "ready"
    _held: set[int] = field(default_factory=set)
    _finished: dict[int, None] = field(default_factory=dict)  # chunks this process marked done, oldest first
    watch: BatchWatch = field(default_factory=BatchWatch)  # the running batch: progress, rate, closed jobs
    overlap: Overlap = field(default_factory=Overlap)  # runs' last writes and next claims, off the engine's path
    shutting_down: Callable[[], bool] = lambda: False  # the worker is stopping: take no more work than the message's
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _beat_lock: threading.Lock = field(default_factory=threading.Lock)  # one state write at a time: "ready" is last
    _thread: threading.Thread | None = None

    @property
    def name(self) -> str:
        assert self.identity is not None
        return self.identity.name

    @property
    def model(self) -> str:
        return self.options.model

    # -- start and stop -------------------------------------------------------------------------------------
    def start(self) -> None:
        """Load, warm up, publish the card, heartbeat. Raises when the model cannot be served."""
        from selfie_core import SelfieEngine, load_model
        from selfie_core.threads import set_threads

        opts = self.options
        self.threads = set_threads(opts.threads)  # before the model loads: its first ops run with them
        self.identity = cards.worker_identity(opts.node_name, opts.model, opts.device_label)
        self._db(lambda s: cards.mark_dead_local_workers(s, self.identity.hostname, me=self.identity.name))
        self._db(lambda s: cards.heartbeat(s, self.identity, state="loading", info=self.info()))
        # beat while loading too: a load longer than worker_alive_seconds (a first conversion on a busy machine, a
        # large model) must not make the API take this worker for gone and refuse submits as for an unserved model
        self._thread = threading.Thread(target=self._heartbeat_loop, name="selfie-heartbeat", daemon=True)
        self._thread.start()
        started = time.monotonic()
        spread: dict[str, Any] = {}
        if opts.gpus:
            from workers.gpus import check_devices_seen, free_memory, weights_max_memory

            free = free_memory()
            check_devices_seen(opts.gpus, len(free))
            # balanced over the GPUs, each leaving a quarter of its free memory for batches (workers.gpus)
            spread = {"device_map": "auto", "max_memory": weights_max_memory(free)}
        # a model added with `selfie models add` loads from the folder (or hub id) and dtype recorded there
        self.source, self.dtype = self._db(
            lambda s: cards.load_source(s, opts.model, model_path=opts.model_path, dtype=opts.dtype))
        loaded = load_model(self.source or opts.model, device=opts.device, dtype=self.dtype,
                            cache_dir=str(self.settings.resolved_model_cache_dir() / opts.model)
                            if not self.source else None, **spread)
        if opts.gpus:
            from workers.gpus import check_placement

            check_placement(loaded.model.hf_device_map, len(opts.gpus))
        self.engine = SelfieEngine(loaded, name=opts.model, cuda_graphs=opts.cuda_graphs,
                                   decode_attention=opts.decode_attention, rms_norm=opts.rms_norm)
        self.runners = build_runners(self.engine, opts.batch_size, self.watch)
        from selfie_jobs.variants import store_root
        from workers.variants import VariantCache

        self.variants = VariantCache(self.engine.model, store_root(self.settings))
        if opts.inject_fault:
            from workers.faults import FaultInjectingRunner

            log.warning("fault injection is on: %s", opts.inject_fault)
            self.runners = {kind: FaultInjectingRunner(r, opts.inject_fault) for kind, r in self.runners.items()}
        self.runner = self.runners["interpret"]
        self.warm_up()
        self.loaded_in_s = time.monotonic() - started
        card = self.model_card()
        self._db(lambda s: cards.write_model_card(s, opts.model, card))
        with self._beat_lock:
            self.state = "ready"
            self._db(lambda s: cards.heartbeat(s, self.identity, state="ready", info=self.info()))
        log.info("worker %s serves %s on %s (loaded in %.1fs)", self.name, opts.model, opts.device_label, self.loaded_in_s)

    def warm_up(self) -> None:
        """One tiny interpretation: first-call costs (kernels, allocator) are paid before real work arrives."""
        from selfie_core import GenerationConfig, InterpretationTemplate, InterpretRequest

        template = InterpretationTemplate.preset("summarize", self.engine.tokenizer)
        self.engine.interpret([InterpretRequest(prompt=WARMUP_PROMPT, layer=0, token=0, key="warmup")],
                              template=template, generation=GenerationConfig(max_new_tokens=1))

    def model_card(self) -> dict[str, Any]:
        from selfie_core.cardinfo import preset_facts

        card = dict(self.engine.model_card())
        presets = preset_facts(self.engine.tokenizer, self.model)
        card.update(name=self.model, presets=presets, default_preset="summarize" if "summarize" in presets else None,
                    source=self.source or self.options.model)
        return card

    def mark_load_failed(self, exc: BaseException) -> None:
        """Say on this worker's card why the model did not load (so the API and operators see it)."""
        self._stop.set()
        if self._thread is not None:  # a beat in flight would write "loading" over "load_failed"
            self._thread.join(timeout=5)
        if self.identity is None:
            return
        info = {**self.info(), "error": f"{type(exc).__name__}: {exc}"[:2000]}
        try:
            self._db(lambda s: cards.heartbeat(s, self.identity, state="load_failed", info=info), retry=False)
        except Exception:  # noqa: BLE001 - the load error is what gets reported; this one is logged
            log.exception("could not mark worker %s load_failed", self.name)

    def stop(self, state: str = "stopped") -> None:
        # runs still completing first: their rows commit and their chunks are marked while the heartbeat still
        # renews the leases (a write retries through an outage for db_retry_seconds)
        self.overlap.drain(timeout=self.settings.db_retry_seconds + 10)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.identity is not None:
            try:
                self._db(lambda s: cards.mark_worker(s, self.name, state), retry=False)
            except Exception:  # noqa: BLE001 - best effort on the way out
                log.exception("could not mark worker %s %s", self.name, state)

    def runner_for(self, kind: str) -> Any:
        runner = self.runners.get(kind)
        if runner is None:
            raise LookupError(f"this worker has no runner for job kind {kind!r}")
        return runner

    # -- what the worker holds ------------------------------------------------------------------------------
    def hold(self, chunk_ids: Sequence[int], jobs: Mapping[int, str] | None = None) -> None:
        """`jobs`: each chunk's job, so that a cancel of the job stops the chunk's rows in the engine."""
        with self._lock:
            self._held.update(chunk_ids)
        if jobs:
            self.watch.hold(jobs)

    def unhold(self, chunk_ids: Sequence[int]) -> None:
        with self._lock:
            self._held.difference_update(chunk_ids)
        self.watch.unhold(chunk_ids)

    def finished(self, chunk_ids: Sequence[int]) -> None:
        """Chunks this process marked done (committed): their own messages, which arrive after they ran as another
        chunk's companions, are answered without a claim's round trips (`has_finished`). The last
        FINISHED_REMEMBERED are kept."""
        with self._lock:
            self._finished.update(dict.fromkeys(chunk_ids))
            for old in list(self._finished)[: max(0, len(self._finished) - FINISHED_REMEMBERED)]:
                del self._finished[old]

    def has_finished(self, chunk_id: int) -> bool:
        """Whether this process marked the chunk done: done is final, so its message needs nothing more."""
        with self._lock:
            return chunk_id in self._finished

    def held(self) -> list[int]:
        with self._lock:
            return sorted(self._held)

    def served(self, rows: int) -> None:
        with self._lock:
            self.batches_served += 1
            self.rows_served += rows

    # -- heartbeat ------------------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "device": self.options.device,
            "gpu": self.options.gpu,
            "gpus": self.options.gpus,
            "devices": self.options.devices,
            "dtype": self.dtype or self.options.dtype,
            "cuda_graphs": self.options.cuda_graphs,
            "decode_attention": self.options.decode_attention,
            "rms_norm": self.options.rms_norm,
            "threads": self.threads,
            "batches_served": self.batches_served,
            "rows_served": self.rows_served,
            "held_chunks": self.held(),
            "in_flight": self.watch.snapshot(),
            "loaded_in_s": round(self.loaded_in_s, 2),
        }
        if self.engine is not None:
            info["cuda_graphs_off"] = self.engine.graphs_off_reason
            device_map = getattr(self.engine.model, "hf_device_map", None)
            if device_map:
                info["device_map"] = {k: str(v) for k, v in device_map.items()}
        if self.options.device.startswith("cuda"):
            try:
                import torch

                if torch.cuda.is_initialized():
                    memory = []
                    for device in self.options.devices:
                        free, total = torch.cuda.mem_get_info(device)
                        memory.append({"device": device, "allocated": torch.cuda.memory_allocated(device),
                                       "reserved": torch.cuda.memory_reserved(device), "free": free,
                                       "total": total, "name": torch.cuda.get_device_name(device)})
                    info["gpu_memory"] = memory[0] if len(memory) == 1 else memory
            except Exception as exc:  # noqa: BLE001 - a heartbeat never fails for lack of memory figures
                info["gpu_memory_error"] = str(exc)
        return info

    def heartbeat_once(self) -> None:
        held = self.held()
        jobs = self.watch.held_jobs()

        def unit(session: Session) -> None:
            cards.heartbeat(session, self.identity, state=self.state, info=self.info())
            if held:
                kept = chunk_ops.renew_leases(session, held, self.name, self.settings.lease_seconds)
                if kept < len(held):
                    # held chunks that are done or closed need no lease; the others were taken from this worker
                    lost = chunk_ops.taken_from(session, held, self.name)
                    if lost:
                        log.warning("worker %s lost the lease of %d chunk(s): %s", self.name, len(lost),
                                    ", ".join(map(str, lost)))
            if jobs:  # a cancel stops the running batch's rows of that job at the next decode step
                closed = closed_jobs(session, jobs)
                if closed:
                    new = self.watch.closed(closed)
                    if new:  # said once, though every beat finds them until the batch lets them go
                        log.info("jobs closed while running here, their rows stop: %s", ", ".join(sorted(new)))

        with self._beat_lock:
            self._db(unit, retry=False)

    def _heartbeat_loop(self) -> None:
        # While it runs chunks, a worker beats every `busy_heartbeat_seconds`: its progress is published and a cancel
        # reaches its engine within that time; idle, every `heartbeat_interval_seconds`.
        tick = min(self.settings.busy_heartbeat_seconds, self.settings.heartbeat_interval_seconds)
        last = time.monotonic()
        while not self._stop.wait(tick):
            if not self.held() and time.monotonic() - last < self.settings.heartbeat_interval_seconds - tick / 2:
                continue
            last = time.monotonic()
            try:
                self.heartbeat_once()
            except Exception as exc:  # noqa: BLE001 - the next beat tries again; the reconciler covers outages
                if chunk_ops.is_transient(exc):
                    log.warning("heartbeat failed, database unavailable: %s", str(exc).splitlines()[0])
                else:
                    log.exception("heartbeat failed")

    def _db(self, fn: Callable[[Session], Any], *, retry: bool = True) -> Any:
        return unit_of_work(self.sessions, fn, self.settings.db_retry_seconds if retry else 0.0)


_RUNTIME: Runtime | None = None


def get_runtime() -> Runtime:
    if _RUNTIME is None:
        raise RuntimeError("no model is loaded in this process (the worker_process_init hook did not run)")
    return _RUNTIME


def start_runtime(settings: Settings, options: WorkerOptions | None = None, *,
                  shutting_down: Callable[[], bool] | None = None) -> Runtime:
    """Build and start this process's runtime (called in the pool child, or directly in tests). `shutting_down`:
    whether the worker's main process is stopping (`workers.launch`)."""
    global _RUNTIME
    from selfie_jobs.db import get_engine, get_sessionmaker

    get_engine.cache_clear()  # never reuse connections inherited from the parent through fork
    options = options or WorkerOptions.from_env()
    runtime = Runtime(settings=settings, options=options,
                      sessions=get_sessionmaker(settings.resolved_database_url()))
    if shutting_down is not None:
        runtime.shutting_down = shutting_down
    try:
        runtime.start()
    except BaseException as exc:
        runtime.mark_load_failed(exc)
        raise
    _RUNTIME = runtime
    return runtime


def stop_runtime(state: str = "stopped") -> None:
    global _RUNTIME
    if _RUNTIME is not None:
        _RUNTIME.stop(state)
        _RUNTIME = None
