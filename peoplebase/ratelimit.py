"""In-memory token buckets, one per key, for two limits (docs/security.md):

- ingestion: records per second per project token (`rate_limit`, `rate_burst`), answered 429
  with Retry-After;
- failed authentication: failures per minute per client address (`auth_fail_limit`) on the
  query API and the web page's sign-in, answered 429 before the credentials are even checked.

Buckets live in the process: with several processes or nodes each enforces its own share.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

RATE_LIMITED = "Project exceeded rate limits. Please retry the request with exponential backoff."


class TokenBuckets:
    """`rate` tokens per second refill each key's bucket, up to `burst`. `rate` 0: no limit.

    A take larger than `burst` is allowed once the bucket is full and leaves it in debt, so
    one big request is never refused forever.
    """

    def __init__(
        self,
        rate: float,
        burst: float,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 100_000,
    ) -> None:
        self.rate = rate
        self.burst = max(burst, 1.0)
        self.clock = clock
        self.max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, when)
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def _level(self, key: str, now: float) -> float:
        tokens, when = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + (now - when) * self.rate)

    def take(self, key: str, n: float = 1.0) -> float:
        """Take n tokens: 0.0 if allowed, else the seconds to wait before trying again."""
        if self.rate <= 0:
            return 0.0
        with self._lock:
            now = self.clock()
            tokens = self._level(key, now)
            need = min(n, self.burst)
            if tokens < need:
                return (need - tokens) / self.rate
            if key not in self._buckets and len(self._buckets) >= self.max_keys:
                self._forget_full(now)
            self._buckets[key] = (tokens - n, now)
            return 0.0

    def wait(self, key: str, n: float = 1.0) -> float:
        """The seconds until n tokens are there, without taking any."""
        if self.rate <= 0:
            return 0.0
        with self._lock:
            tokens = self._level(key, self.clock())
            need = min(n, self.burst)
            return 0.0 if tokens >= need else (need - tokens) / self.rate

    def _forget_full(self, now: float) -> None:
        """Drop buckets that have refilled (they hold no state a new bucket would not)."""
        for key in [k for k in self._buckets if self._level(k, now) >= self.burst]:
            del self._buckets[key]
        if len(self._buckets) >= self.max_keys:  # still full: forget the oldest half
            oldest = sorted(self._buckets, key=lambda k: self._buckets[k][1])
            for key in oldest[: len(oldest) // 2]:
                del self._buckets[key]


def retry_after(seconds: float) -> int:
    """Whole seconds for a Retry-After header (at least 1)."""
    return max(1, math.ceil(seconds))


class FailedAuthLimiter:
    """At most `per_minute` failed authentications per client address, then 429 until refilled."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.buckets = TokenBuckets(per_minute / 60.0, float(per_minute), clock)

    def blocked(self, client: str) -> int:
        """0 when this client may try to authenticate, else the seconds for Retry-After."""
        wait = self.buckets.wait(client)
        return retry_after(wait) if wait > 0 else 0

    def failed(self, client: str) -> None:
        self.buckets.take(client)
