"""The cost per request of the api's rate limit (`api.ratelimit`, a moving window from the `limits` library) against
the fixed window it replaced (one Lua INCR/PEXPIRE script per request, kept here as the reference), in the same run,
alternating rounds.

Every api request with a key passes through `hit`. Measured: allowed requests (the common case: the key is under its
limit, `--limit` defaults to the service's 600/minute, so the moving window's list is up to that long) and refused
ones (the moving window then reads the window's start for Retry-After: a second round trip), on Redis and, for the
per-process fallback, in memory. Prints microseconds per hit (median of rounds) and the ratio new / reference.

    .venv/bin/python benchmarks/ratelimit_bench.py --redis-url redis://127.0.0.1:6379/15 [--hits 3000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

import redis

from api.ratelimit import LocalRateLimiter, RedisRateLimiter

WINDOW_SECONDS = 60

_FIXED_WINDOW_SCRIPT = """
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


class FixedWindowRedis:
    """The replaced limiter: a counter per key and calendar minute."""

    def __init__(self, url: str, per_minute: int, prefix: str) -> None:
        self.per_minute, self.prefix = per_minute, prefix
        self._client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
        self._script = self._client.register_script(_FIXED_WINDOW_SCRIPT)

    def hit(self, key: object) -> int | None:
        now = time.time()
        window = int(now // WINDOW_SECONDS)
        remaining_ms = int((WINDOW_SECONDS - now % WINDOW_SECONDS) * 1000) + 1000
        count, ttl_ms = self._script(keys=[f"{self.prefix}{key}:{window}"], args=[remaining_ms])
        if int(count) > self.per_minute:
            return max(1, -(-(int(ttl_ms) - 1000) // 1000))
        return None

    def close(self) -> None:
        self._client.close()


class FixedWindowLocal:
    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._lock = threading.Lock()
        self._windows: dict[object, tuple[int, int]] = {}

    def hit(self, key: object) -> int | None:
        now = time.time()
        window = int(now // WINDOW_SECONDS)
        with self._lock:
            start, count = self._windows.get(key, (window, 0))
            if start != window:
                start, count = window, 0
            if count >= self.per_minute:
                return max(1, int(WINDOW_SECONDS - now % WINDOW_SECONDS))
            self._windows[key] = (start, count + 1)
        return None


def microseconds_per_hit(limiter, hits: int, keys: int) -> float:
    start = time.perf_counter()
    for n in range(hits):
        limiter.hit(n % keys)
    return (time.perf_counter() - start) / hits * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", required=True, help="a Redis database the bench may write keys to")
    parser.add_argument("--hits", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--limit", type=int, default=600, help="requests per minute (the service's default)")
    args = parser.parse_args()
    prefix = "selfie:ratelimit-bench:" + os.urandom(4).hex()
    # allowed: hits spread over enough keys that none reaches its limit; refused: one key, limit 1
    allowed_keys = max(1, -(-args.hits * args.rounds // args.limit) + 1)
    results: dict[str, dict[str, list[float]]] = {}

    def record(case: str, which: str, value: float) -> None:
        results.setdefault(case, {}).setdefault(which, []).append(value)

    for r in range(args.rounds):
        redis_new = RedisRateLimiter(args.redis_url, args.limit, prefix=f"{prefix}:new:{r}")
        redis_old = FixedWindowRedis(args.redis_url, args.limit, f"{prefix}:old:{r}:")
        refused_new = RedisRateLimiter(args.redis_url, 1, prefix=f"{prefix}:new-refused:{r}")
        refused_old = FixedWindowRedis(args.redis_url, 1, f"{prefix}:old-refused:{r}:")
        for case, new, old, keys in [("redis, allowed", redis_new, redis_old, allowed_keys),
                                     ("redis, refused", refused_new, refused_old, 1),
                                     ("memory, allowed", LocalRateLimiter(args.limit), FixedWindowLocal(args.limit),
                                      allowed_keys),
                                     ("memory, refused", LocalRateLimiter(1), FixedWindowLocal(1), 1)]:
            pair = [("reference", old), ("limits", new)]
            for which, limiter in pair if r % 2 == 0 else pair[::-1]:
                record(case, which, microseconds_per_hit(limiter, args.hits, keys))
        for limiter in (redis_new, redis_old, refused_new, refused_old):
            limiter.close()
    client = redis.Redis.from_url(args.redis_url)
    for key in client.scan_iter(f"{prefix}*"):
        client.delete(key)
    client.close()
    print(f"{'case':18} {'fixed window (us/hit)':>22} {'limits moving window (us/hit)':>30} {'ratio':>6}")
    for case, by in results.items():
        old, new = statistics.median(by["reference"]), statistics.median(by["limits"])
        print(f"{case:18} {old:22.1f} {new:30.1f} {new / old:6.2f}")


if __name__ == "__main__":
    main()
