"""Requests per API key per minute, counted in Redis so that every api process shares one count.

A fixed window per key and minute: one Lua script increments the window's counter, gives a new counter its expiry
and returns the count with the window's remaining lifetime, atomically (no INCR/EXPIRE race, one round trip).
Without a configured broker (no SELFIE_REDIS_URL) each process counts on its own, and says so in the log.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from typing import Protocol

log = logging.getLogger(__name__)

WINDOW_SECONDS = 60
KEY_PREFIX = "selfie:ratelimit:"
RETRY_REDIS_AFTER_SECONDS = 5.0

# KEYS[1] = the window's counter; ARGV[1] = its lifetime in ms. Returns {count, remaining ms}.
_HIT_SCRIPT = """
local count = redis.call('INCR', KEYS[1])
if count == 1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  ttl = tonumber(ARGV[1])
end
return {count, ttl}
"""


class Limiter(Protocol):
    per_minute: int

    def hit(self, key: object, now: float | None = None) -> int | None:
        """None when allowed, else the whole seconds (>= 1) until the key may ask again."""


class LocalRateLimiter:
    """A fixed window per process: the fallback when there is no broker to count in."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._lock = threading.Lock()
        self._windows: dict[object, tuple[int, int]] = {}

    def hit(self, key: object, now: float | None = None) -> int | None:
        now = time.time() if now is None else now
        window = int(now // WINDOW_SECONDS)
        with self._lock:
            start, count = self._windows.get(key, (window, 0))
            if start != window:
                start, count = window, 0
            if count >= self.per_minute:
                return max(1, int(WINDOW_SECONDS - now % WINDOW_SECONDS))
            self._windows[key] = (start, count + 1)
            if len(self._windows) > 100_000:  # forget stale windows
                self._windows = {k: v for k, v in self._windows.items() if v[0] == window}
        return None


class RedisRateLimiter:
    """The count of every api process, in Redis. If Redis does not answer, requests pass (the limit protects
    capacity, it is not an access control) for the next few seconds without asking it again, and a warning is
    logged at most once a minute."""

    def __init__(self, redis_url: str, per_minute: int, *, prefix: str = KEY_PREFIX) -> None:
        import redis

        self.per_minute = per_minute
        self.prefix = prefix
        self._client = redis.Redis.from_url(redis_url, socket_connect_timeout=1, socket_timeout=1,
                                            health_check_interval=30)
        self._script = self._client.register_script(_HIT_SCRIPT)
        self._last_warning = 0.0
        self._skip_until = 0.0

    def hit(self, key: object, now: float | None = None) -> int | None:
        import redis

        if time.monotonic() < self._skip_until:
            return None  # Redis failed a moment ago: do not make every request wait for its timeout
        now = time.time() if now is None else now
        window = int(now // WINDOW_SECONDS)
        remaining_ms = int((WINDOW_SECONDS - now % WINDOW_SECONDS) * 1000) + 1000  # outlive the window a little
        try:
            count, ttl_ms = self._script(keys=[f"{self.prefix}{key}:{window}"], args=[remaining_ms])
        except redis.RedisError as exc:
            self._skip_until = time.monotonic() + RETRY_REDIS_AFTER_SECONDS
            if time.monotonic() - self._last_warning > 60:
                self._last_warning = time.monotonic()
                log.warning("rate limit not enforced: Redis does not answer (%s)", exc)
            return None
        if int(count) > self.per_minute:
            window_left_ms = int(ttl_ms) - 1000  # the expiry outlives the window by one second
            return max(1, -(-window_left_ms // 1000))
        return None

    def close(self) -> None:
        self._client.close()


def make_rate_limiter(redis_url: str | None, per_minute: int, database_url: str = "") -> Limiter:
    """Key ids are numbered per database, so the counters are named after the database as well (two services
    that share a Redis but not a database never share a count)."""
    if not redis_url:
        log.warning(
            "no broker configured (SELFIE_REDIS_URL is unset): the rate limit of %d requests per minute is counted "
            "per api process, so N processes allow N times as many", per_minute,
        )
        return LocalRateLimiter(per_minute)
    scope = hashlib.sha256(database_url.encode()).hexdigest()[:12]
    return RedisRateLimiter(redis_url, per_minute, prefix=f"{KEY_PREFIX}{scope}:")
