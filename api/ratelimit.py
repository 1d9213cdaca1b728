"""Requests per API key per minute, counted in Redis so that every api process shares one count.

A moving window (the `limits` library's): a request is allowed when the key made fewer than `per_minute` requests
in the 60 seconds before it, so a burst straddling a minute boundary gets no second allowance as it would with a
fixed window per calendar minute. In Redis each key's window is a list of request times, checked and appended by
one Lua script (one round trip, atomic across processes). Without a configured broker (no SELFIE_REDIS_URL) each
process counts on its own, and says so in the log.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from typing import Protocol

from limits import RateLimitItemPerMinute
from limits.errors import StorageError
from limits.storage import MemoryStorage, RedisStorage, Storage
from limits.strategies import MovingWindowRateLimiter

log = logging.getLogger(__name__)

WINDOW_SECONDS = 60
KEY_PREFIX = "selfie:ratelimit"
RETRY_REDIS_AFTER_SECONDS = 5.0


class Limiter(Protocol):
    per_minute: int

    def hit(self, key: object) -> int | None:
        """None when allowed, else the whole seconds (>= 1) until the key may ask again."""


class _MovingWindowLimiter:
    def __init__(self, storage: Storage, per_minute: int) -> None:
        self.per_minute = per_minute
        self._storage = storage
        self._item = RateLimitItemPerMinute(per_minute)
        self._window = MovingWindowRateLimiter(storage)

    def _hit(self, key: object) -> int | None:
        if self._window.hit(self._item, str(key)):
            return None
        # refused: a slot frees when the oldest request still in the window leaves it (a second round trip, paid
        # only by refused requests)
        frees_at, _ = self._window.get_window_stats(self._item, str(key))
        return min(WINDOW_SECONDS, max(1, math.ceil(frees_at - time.time())))


class LocalRateLimiter(_MovingWindowLimiter):
    """A moving window per process: the fallback when there is no broker to count in."""

    def __init__(self, per_minute: int) -> None:
        super().__init__(MemoryStorage(), per_minute)

    def hit(self, key: object) -> int | None:
        return self._hit(key)


class RedisRateLimiter(_MovingWindowLimiter):
    """The count of every api process, in Redis. If Redis does not answer, requests pass (the limit protects
    capacity, it is not an access control) for the next few seconds without asking it again, and a warning is
    logged at most once a minute."""

    def __init__(self, redis_url: str, per_minute: int, *, prefix: str = KEY_PREFIX) -> None:
        self.prefix = prefix
        storage = RedisStorage(redis_url, key_prefix=prefix, wrap_exceptions=True, socket_connect_timeout=1,
                               socket_timeout=1, health_check_interval=30)
        super().__init__(storage, per_minute)
        self._last_warning = 0.0
        self._skip_until = 0.0

    def hit(self, key: object) -> int | None:
        if time.monotonic() < self._skip_until:
            return None  # Redis failed a moment ago: do not make every request wait for its timeout
        try:
            return self._hit(key)
        except StorageError as exc:
            self._skip_until = time.monotonic() + RETRY_REDIS_AFTER_SECONDS
            if time.monotonic() - self._last_warning > 60:
                self._last_warning = time.monotonic()
                log.warning("rate limit not enforced: Redis does not answer (%s)", exc.storage_error)
            return None

    def close(self) -> None:
        self._storage.get_connection().close()


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
    return RedisRateLimiter(redis_url, per_minute, prefix=f"{KEY_PREFIX}:{scope}")
