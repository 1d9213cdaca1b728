"""api.overload.ConcurrencyLimit: a bounded number of requests in the app, a bounded wait in line, then 503."""

from __future__ import annotations

import asyncio
import time

from api.overload import ConcurrencyLimit


def _serve(limit: int, wait_s: float, paths: list[str], busy_s: float = 1.0) -> list[tuple[int, int, float]]:
    """Requests to `paths`, all at once, through the middleware over an app that takes `busy_s` per request;
    returns (request index, status, seconds until its answer began) in the order answered."""

    async def app(scope, receive, send):
        await asyncio.sleep(busy_s)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def main():
        middleware = ConcurrencyLimit(app, limit, wait_s)
        answers = []
        t0 = time.monotonic()

        async def call(i, path):
            started = {}

            async def send(message):
                if message["type"] == "http.response.start":
                    started["status"] = message["status"]
                    started["headers"] = dict(message["headers"])
                    answers.append((i, message["status"], time.monotonic() - t0, started["headers"]))

            await middleware({"type": "http", "path": path, "method": "GET", "headers": []}, None, send)

        await asyncio.gather(*(call(i, p) for i, p in enumerate(paths)))
        return answers

    return asyncio.run(main())


def test_requests_over_the_limit_wait_in_line_then_get_503_with_retry_after():
    answers = _serve(limit=2, wait_s=0.3, paths=["/v1/jobs"] * 4)
    served = [a for a in answers if a[1] == 200]
    refused = [a for a in answers if a[1] == 503]
    assert len(served) == 2 and len(refused) == 2
    assert all(0.25 <= t < 0.9 for _, _, t, _ in refused)  # after the bounded wait, before a slot frees
    assert all(int(h[b"retry-after"]) > 0 for *_, h in refused)


def test_a_request_in_line_gets_the_slot_that_frees_within_its_wait():
    answers = _serve(limit=1, wait_s=2.0, paths=["/v1/jobs"] * 2, busy_s=0.3)
    assert [status for _, status, _, _ in answers] == [200, 200]
    assert answers[1][2] >= 0.55  # served one after the other


def test_liveness_does_not_wait_in_line():
    answers = _serve(limit=1, wait_s=5.0, paths=["/v1/jobs", "/healthz"], busy_s=0.5)
    assert {i: status for i, status, _, _ in answers} == {0: 200, 1: 200}
    assert max(t for _, _, t, _ in answers) < 0.9  # /healthz did not wait for /v1/jobs' slot
