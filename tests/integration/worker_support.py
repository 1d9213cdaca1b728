"""Helpers for worker tests: a tiny random LLaMA saved as a Hugging Face folder, real worker processes, waits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[2]
MODEL = "tiny"
NUM_LAYERS = 2
PROMPTS = ("The Eiffel Tower is located in Paris.", "The quick brown fox jumps over the lazy dog.")


def save_tiny_model(path: Path, layers: int = NUM_LAYERS, *, hidden_size: int = 32, context: int = 256) -> Path:
    """A random LLaMA (float32) with a small real BPE tokenizer, saved where `load_model(path)` finds it. A wider
    one with a long context (hidden_size=256, layers=6, context=4096) decodes slowly enough for a batch of 1,000
    new tokens to take tens of seconds on a CPU, as a real model's batch does."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.unit.core.conftest import build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=context,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, initializer_range=0.2)
    LlamaForCausalLM(cfg).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def wait_for(predicate: Callable[[], Any], timeout: float, *, interval: float = 0.2, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def worker_env(database_url: str, redis_url: str, data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SELFIE_")}
    env.update(
        SELFIE_DATABASE_URL=database_url,
        SELFIE_REDIS_URL=redis_url,
        SELFIE_DATA_DIR=str(data_dir),
        SELFIE_HEARTBEAT_INTERVAL_SECONDS="1",
        SELFIE_WORKER_ALIVE_SECONDS="6",
        SELFIE_LEASE_SECONDS="30",
        SELFIE_RECONCILE_INTERVAL_SECONDS="2",
        SELFIE_ENQUEUE_GRACE_SECONDS="5",
        PYTHONPATH=str(ROOT),
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.update(extra)
    return env


class WorkerProcess:
    """`python -m workers worker ...` in its own process group, with its log in a file."""

    def __init__(self, name: str, model_path: Path, env: dict[str, str], log_dir: Path, *, batch_size: int = 4,
                 extra: tuple[str, ...] = (), model: str = MODEL):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        cmd = [sys.executable, "-m", "workers", "worker", "--model", model, "--model-path", str(model_path),
               "--batch-size", str(batch_size), "--hostname", f"{name}@testhost", "--loglevel", "INFO", *extra]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def children(self) -> list[int]:
        try:
            return [c.pid for c in psutil.Process(self.pid).children()]
        except psutil.NoSuchProcess:
            return []

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 20.0) -> None:
        stop_process_group(self.proc, timeout)
        self._log.close()


def stop_process_group(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM the process group of `proc` (started with start_new_session), then SIGKILL what is left of it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        except ProcessLookupError:
            pass
    # children that outlived their parent (they are in the same process group)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def wait_worker_ready(worker: WorkerProcess, client: Any, model: str = MODEL, timeout: float = 120) -> None:
    """Until the worker's heartbeat says ready (through the API's /v1/models) and Celery consumes its queue."""

    def ready():
        if worker.proc.poll() is not None:
            raise AssertionError(worker.log()[-4000:])
        return any(m["name"] == model and any(w["state"] == "ready" for w in m["workers"]) for m in client.models())

    wait_for(ready, timeout, what="worker ready")
    wait_for(lambda: "ready." in worker.log(), 30, what="worker consuming")
