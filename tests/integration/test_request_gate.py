"""Before the body is read: the key is checked (401) and the route's body limit (413), in a real uvicorn process.

An unauthenticated client once made the API read and parse a 115 MB body before its 401 (325 MB of API memory for
one request). Here a 100 MB body is offered to the API process without a key while its RSS is sampled: the answer
must come while the client has sent no more than the sockets buffer, and the process must not grow.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from api.limits import BODY_LIMITS
from selfie_jobs.auth import create_key
from selfie_jobs.db import get_engine, session_scope
from selfie_jobs.settings import Settings
from tests import services
from tests.apisupport import prepare_database
from tests.integration.worker_support import stop_process_group, wait_for

ROOT = Path(__file__).resolve().parents[2]
BODY_BYTES = 100 << 20
#: What the API process may grow by while a 100 MB body is offered: interpreter noise, not the body.
RSS_GROWTH_LIMIT = 40 << 20


@pytest.fixture
def api_process(tmp_path, redis_url):
    """`uvicorn api.main:create_app --factory` with auth on, on a migrated SQLite file; yields (url, pid, key)."""
    database_url = f"sqlite:///{tmp_path / 'gate.db'}"
    prepare_database(database_url)
    with session_scope(database_url) as s:
        _, secret = create_key(s, "gate")
    get_engine.cache_clear()
    port = services.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SELFIE_")}
    env.update(SELFIE_DATABASE_URL=database_url, SELFIE_REDIS_URL=redis_url, SELFIE_DATA_DIR=str(tmp_path),
               SELFIE_AUTH_ENABLED="true", PYTHONPATH=str(ROOT))
    log = open(tmp_path / "api.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "api.main:create_app", "--factory", "--host",
                             "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def up():
            if proc.poll() is not None:
                raise RuntimeError((tmp_path / "api.log").read_text())
            try:
                return httpx.get(url + "/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, 60, what="the API process")
        yield url, proc.pid, secret, port
    finally:
        stop_process_group(proc, 10)
        log.close()


def offer_body(port: int, method: str, path: str, total: int, *, headers: dict[str, str] | None = None,
               chunked: bool = False) -> tuple[int, int]:
    """Send a request with a `total`-byte body in 256 KiB pieces, stopping once the server answers or closes.

    Returns (status, body bytes sent before the answer came). A reader thread waits for the answer from the start:
    a server that answers without reading the body closes the connection with the body unread, which resets it,
    and an answer not read before the reset arrives is lost."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    # the type each route reads: a form route given JSON would not read the body at all, key or no key
    kind = "multipart/form-data; boundary=b0undary" if path == "/v1/prompt-sets" else "application/json"
    head = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", f"Content-Type: {kind}"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    head.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {total}")
    answer = bytearray()
    answered = threading.Event()

    def read() -> None:
        try:
            while b"\r\n" not in answer and (got := sock.recv(65536)):
                answer.extend(got)
        except OSError:
            pass
        answered.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    piece = b"[" * (1 << 18)
    sent = 0
    try:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        while sent < total and not answered.is_set():
            data = piece[: total - sent]
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
            except OSError:
                break
            sent += len(data)
        if sent >= total and chunked and not answered.is_set():
            try:
                sock.sendall(b"0\r\n\r\n")
            except OSError:
                pass  # the server answered and closed between the check and this send: its answer is read below
        reader.join(60)
        return (int(answer.split(b" ", 2)[1]) if answer else 0), sent
    finally:
        sock.close()


class RssPeak:
    """Samples a process's resident memory every 10 ms until stopped; `growth` is the peak above the first sample."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.base = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.01)

    def __enter__(self) -> RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.3)  # whatever the request made the process take, it has taken by now
        self._stop.set()
        self._thread.join()

    @property
    def growth(self) -> int:
        return self.peak - self.base


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/prompt-sets"])
def test_unauthenticated_large_body_is_refused_before_it_is_read(api_process, path, chunked):
    url, pid, _secret, port = api_process
    for _ in range(2):  # the first requests warm the process up (imports, the route table)
        httpx.post(url + path, json={}, timeout=10)
    with RssPeak(pid) as rss:
        status, sent = offer_body(port, "POST", path, BODY_BYTES, chunked=chunked)
    assert status == 401
    assert sent < BODY_BYTES // 4, f"{sent} bytes were taken before the 401"
    assert rss.growth < RSS_GROWTH_LIMIT, f"the API grew by {rss.growth / 2**20:.0f} MiB"
    with RssPeak(pid) as rss:  # a wrong key, the same
        status, sent = offer_body(port, "POST", path, BODY_BYTES, chunked=chunked,
                                  headers={"Authorization": "Bearer sk-selfie-not-a-real-key-0123456789"})
    assert status == 401 and sent < BODY_BYTES // 4 and rss.growth < RSS_GROWTH_LIMIT


def test_each_route_limit_answers_413(api_process):
    """A declared body over each route's limit is refused from the headers; a chunked one once it passes it."""
    url, pid, secret, port = api_process
    auth = {"Authorization": f"Bearer {secret}"}
    settings = Settings(_env_file=None)
    routes = [(rule.method, rule.path, rule.limit(settings)) for rule in BODY_LIMITS]
    routes.append(("POST", "/v1/audits", settings.max_body_bytes))  # every other route: the small default
    for method, path, limit in routes:
        status, sent = offer_body(port, method, path, limit + 1, headers=auth)
        # refused from the headers: a large body is not taken (a small one fits the sockets' buffers whole)
        assert status == 413 and (limit < 8 << 20 or sent < limit), (path, status, sent)
    for method, path, limit in routes:
        if limit > 32 << 20:
            continue  # a streamed upload's limit is disk, not memory: its declared-length case above suffices
        with RssPeak(pid) as rss:
            status, sent = offer_body(port, method, path, limit + (2 << 20), headers=auth, chunked=True)
        assert status == 413, (path, status)
        assert rss.growth < limit + RSS_GROWTH_LIMIT, (path, rss.growth)
    with httpx.Client(base_url=url, headers=auth, timeout=10) as http:
        assert http.post("/v1/jobs", json={"prompts": ["x"], "model": "nope"}).status_code == 422  # under: served
        # a lenses job takes what an interpret job takes (it was held to the 1 MiB default: 413 at 1.1 MB)
        big = {"prompts": ["a cat sat on the mat " * 60] * 900, "model": "nope"}
        assert http.post("/v1/jobs/lenses", json=big).status_code == 422
        assert http.post("/v1/jobs/generate", json=big).status_code == 422  # a generate job's prompts, likewise


def test_public_routes_stay_public_and_the_rest_ask_for_a_key(api_process):
    url, _pid, secret, _port = api_process
    with httpx.Client(base_url=url, timeout=10) as http:
        for path in ("/healthz", "/readyz", "/docs", "/openapi.json", "/ui", "/ui/jobs/" + "0" * 32, "/metrics"):
            assert http.get(path).status_code in (200, 503), path  # /readyz: 503 is its own verdict, not auth
        for method, path in (("GET", "/v1/jobs"), ("GET", "/v1/models"), ("POST", "/v1/audits"),
                             ("GET", "/v1/prompt-sets"), ("POST", "/v1/jobs/" + "0" * 32 + "/cancel")):
            resp = http.request(method, path)
            assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer", (method, path)
        assert http.get("/v1/nope").status_code == 404  # no route: the app's own answer
        assert http.get("/v1/jobs", headers={"Authorization": f"Bearer {secret}"}).status_code == 200
