"""The client's retries against a real HTTP server that answers what each test scripts: 429/503 wait the server's
Retry-After, a dropped connection backs off, a server that goes away after answering is retried, then reported."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from selfie_client import Client, SelfieError, ServiceUnreachable


class ScriptedServer(ThreadingHTTPServer):
    """Answers the n-th request with script[n]: (status, headers) or "drop" (the connection closed unanswered);
    past the script's end, 200 with an empty model list."""

    def __init__(self, script: list) -> None:
        self.script, self.seen = list(script), []
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: ScriptedServer

    def do_GET(self) -> None:  # noqa: N802 - the http.server name
        self.server.seen.append(time.monotonic())
        step = self.server.script.pop(0) if self.server.script else (200, {})
        if step == "drop":
            self.close_connection = True
            return
        status, headers = step
        body = json.dumps({"models": []} if status == 200 else {"detail": "busy"}).encode()
        self.send_response(status)
        for name, value in {**headers, "Content-Type": "application/json", "Content-Length": str(len(body))}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def serve() -> Iterator:
    servers = []

    def start(script: list) -> ScriptedServer:
        server = ScriptedServer(script)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_429_and_503_are_retried_after_the_servers_retry_after(serve):
    server = serve([(503, {"Retry-After": "0.3"}), (429, {"Retry-After": "0.5"})])
    with Client(server.url, retries=2) as client:
        assert client.models() == []
    assert len(server.seen) == 3
    gaps = [b - a for a, b in zip(server.seen, server.seen[1:])]
    assert gaps[0] >= 0.3 and gaps[1] >= 0.5, gaps


def test_a_refusal_past_the_retries_or_the_wait_budget_is_raised(serve):
    server = serve([(503, {"Retry-After": "0.1"})] * 3)
    with Client(server.url, retries=2) as client, pytest.raises(SelfieError) as refused:
        client.models()
    assert refused.value.status == 503 and len(server.seen) == 3  # the first try and 2 retries
    server = serve([(429, {"Retry-After": "0.4"})] * 3)
    with Client(server.url, retries=5, max_wait=0.5) as client, pytest.raises(SelfieError) as refused:
        client.models()
    assert refused.value.status == 429 and len(server.seen) == 2  # a second 0.4 s wait would pass max_wait


def test_a_dropped_connection_backs_off_and_is_tried_again(serve):
    server = serve(["drop", "drop"])
    with Client(server.url, retries=2) as client:
        assert client.models() == []
    gaps = [b - a for a, b in zip(server.seen, server.seen[1:])]
    assert len(server.seen) == 3 and gaps[0] >= 0.2 and gaps[1] >= 0.4, gaps  # 0.2 s, then twice as long


def test_a_server_that_goes_away_after_answering_is_retried_then_reported(serve):
    server = serve([])
    sent = []
    with Client(server.url, retries=2) as client:
        assert client.models() == []
        server.shutdown()
        server.server_close()  # the port now refuses connections, as a restarting api's does
        original = client._http.request
        client._http.request = lambda *a, **kw: sent.append(time.monotonic()) or original(*a, **kw)
        with pytest.raises(ServiceUnreachable):
            client.models()
    gaps = [b - a for a, b in zip(sent, sent[1:])]
    assert len(sent) == 3 and gaps[0] >= 0.2 and gaps[1] >= 0.4, gaps
