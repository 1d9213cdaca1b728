"""The per-key rate limit is one count in Redis shared by every api process (two uvicorn processes here)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis

from api.ratelimit import LocalRateLimiter, RedisRateLimiter, make_rate_limiter
from selfie_jobs.auth import create_key
from selfie_jobs.db import session_scope
from tests import services
from tests.apisupport import prepare_database
from tests.integration.worker_support import wait_for

ROOT = Path(__file__).resolve().parents[2]


def _api_process(database_url: str, redis_url: str, port: int, log_path: Path, **env_extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SELFIE_")}
    env.update(SELFIE_DATABASE_URL=database_url, SELFIE_REDIS_URL=redis_url, SELFIE_DATA_DIR=str(log_path.parent),
               PYTHONPATH=str(ROOT), **env_extra)
    log = open(log_path, "wb")  # noqa: SIM115 - the child holds it
    return subprocess.Popen([sys.executable, "-m", "uvicorn", "api.main:create_app", "--factory", "--host",
                             "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _outside_the_last_seconds_of_a_minute(margin: float = 12.0) -> None:
    left = 60 - time.time() % 60
    if left < margin:
        time.sleep(left + 0.5)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_two_api_processes_share_one_count(sqlite_url, redis_url, tmp_path):
    prepare_database(sqlite_url)
    with session_scope(sqlite_url) as s:
        _, secret = create_key(s, "busy")
    ports = [services.free_port(), services.free_port()]
    procs = [_api_process(sqlite_url, redis_url, port, tmp_path / f"api{n}.log", SELFIE_RATE_LIMIT_PER_MINUTE="4")
             for n, port in enumerate(ports)]
    try:
        clients = [httpx.Client(base_url=f"http://127.0.0.1:{p}", timeout=10,
                                headers={"Authorization": f"Bearer {secret}"}) for p in ports]

        def up():
            for proc, client in zip(procs, clients, strict=True):
                assert proc.poll() is None, (tmp_path / "api0.log").read_text() + (tmp_path / "api1.log").read_text()
                try:
                    client.get("/healthz")
                except httpx.TransportError:
                    return False
            return True

        wait_for(up, 60, what="two api processes")
        _outside_the_last_seconds_of_a_minute()
        codes = [clients[n % 2].get("/v1/jobs").status_code for n in range(8)]
        # 4 per minute in all: counted per process, each would let 4 through (8 in all)
        assert codes.count(200) == 4 and codes.count(429) == 4, codes
        assert codes[:4] == [200, 200, 200, 200], codes
        limited = clients[1].get("/v1/jobs")
        assert limited.status_code == 429
        assert 1 <= int(limited.headers["retry-after"]) <= 60
        assert "4 requests per minute" in limited.json()["detail"]
        for client in clients:
            client.close()
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)


def _prefix() -> str:
    return "selfie:ratelimit:test-" + os.urandom(4).hex()


def test_redis_counter_is_per_key_and_window(redis_url):
    limiter = RedisRateLimiter(redis_url, 2, prefix=_prefix())
    try:
        assert [limiter.hit(1), limiter.hit(1)] == [None, None]
        assert 59 <= limiter.hit(1) <= 60  # a slot frees when the first request leaves the window, 60 s after it
        assert limiter.hit(2) is None  # another key has its own count
        keys = redis.Redis.from_url(redis_url).keys(limiter.prefix + "*")
        ttls = [redis.Redis.from_url(redis_url).ttl(k) for k in keys]
        assert len(keys) == 2 and all(0 < t <= 60 for t in ttls)  # every window expires
    finally:
        limiter.close()


def test_two_limiters_on_one_redis_share_one_window(redis_url):
    prefix = _prefix()
    limiters = [RedisRateLimiter(redis_url, 3, prefix=prefix), RedisRateLimiter(redis_url, 3, prefix=prefix)]
    try:
        results = [limiters[n % 2].hit(7) for n in range(6)]
        assert results[:3] == [None, None, None], results
        assert all(r is not None and 1 <= r <= 60 for r in results[3:]), results  # 3 in all, not 3 each
    finally:
        for limiter in limiters:
            limiter.close()


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_a_burst_straddling_a_minute_boundary_gets_no_second_allowance(redis_url):
    """A fixed window per calendar minute lets `per_minute` through just before the minute turns and as many just
    after (2x in a second or two); the moving window refuses the second burst, in Redis and in one process."""
    prefix = _prefix()
    shared = [RedisRateLimiter(redis_url, 3, prefix=prefix), RedisRateLimiter(redis_url, 3, prefix=prefix)]
    local = LocalRateLimiter(3)
    try:
        left = 60 - time.time() % 60
        if left < 2.0:  # too close to this minute's end to fit the first burst before it
            left += 60
        time.sleep(left - 1.5)  # 1.5 s before the minute turns
        before = [shared[n % 2].hit(1) for n in range(3)] + [local.hit(1) for _ in range(3)]
        assert 60 - time.time() % 60 > 0.5, "the first burst did not finish before the minute turned"
        time.sleep(60 - time.time() % 60 + 0.5)  # 0.5 s into the next minute
        after = [shared[n % 2].hit(1) for n in range(3)] + [local.hit(1) for _ in range(3)]
        assert before == [None] * 6
        assert all(r is not None and 57 <= r <= 60 for r in after), after
    finally:
        for limiter in shared:
            limiter.close()


def test_no_broker_falls_back_to_a_per_process_count_and_says_so(caplog):
    with caplog.at_level(logging.WARNING, logger="api.ratelimit"):
        limiter = make_rate_limiter(None, 5)
    assert isinstance(limiter, LocalRateLimiter)
    assert "counted per api process" in caplog.text


def test_unreachable_redis_lets_requests_pass_with_a_warning(caplog):
    limiter = RedisRateLimiter(f"redis://127.0.0.1:{services.free_port()}/0", 1)
    calls = []
    acquire = limiter._storage.acquire_entry
    limiter._storage.acquire_entry = lambda *a, **kw: calls.append(a) or acquire(*a, **kw)
    with caplog.at_level(logging.WARNING, logger="api.ratelimit"):
        assert all(limiter.hit(1) is None for _ in range(100))
    assert len(calls) == 1  # a failed Redis is not asked again for a few seconds (no timeout on every request)
    assert caplog.text.count("rate limit not enforced") == 1


def test_a_failed_redis_is_asked_again_after_a_pause(monkeypatch):
    monkeypatch.setattr("api.ratelimit.RETRY_REDIS_AFTER_SECONDS", 0.2)
    limiter = RedisRateLimiter(f"redis://127.0.0.1:{services.free_port()}/0", 1)
    calls = []
    acquire = limiter._storage.acquire_entry
    limiter._storage.acquire_entry = lambda *a, **kw: calls.append(a) or acquire(*a, **kw)
    assert limiter.hit(1) is None and limiter.hit(1) is None
    assert len(calls) == 1
    time.sleep(0.3)
    assert limiter.hit(1) is None
    assert len(calls) == 2
