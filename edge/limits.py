"""Per-client rate bounds, sans I/O: a token bucket and the pending-connection cap.

Each bound here answers "may this client do one more X now?" from plain numbers and a clock
the caller passes in, so its tests need no server and no sleeping.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable


class TokenBucket:
    """At most `rate` events per second on average, with bursts of up to `burst` events.

    `take(now)` spends one token and returns True, or returns False (nothing spent) when the
    bucket is empty. `now` is a monotonic time in seconds.
    """

    def __init__(self, rate: float, burst: float, now: float) -> None:
        """`rate` > 0 tokens per second, `burst` >= 1 tokens at most. Raises ValueError."""
        if rate <= 0 or burst < 1:
            raise ValueError(f"rate must be > 0 and burst >= 1 (got {rate}, {burst})")
        self.rate, self.burst = rate, burst
        self._tokens = burst
        self._at = now

    def take(self, now: float) -> bool:
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


class PendingCap:
    """Connections that have not yet authenticated, at most `limit` of them at once.

    Overflow policy: drop the OLDEST pending connection (its `abort` is called) to admit the
    new one. A flood of half-open connections therefore holds at most `limit` file
    descriptors, and a real client, whose handshake takes milliseconds, still gets through:
    it is only evicted if `limit` newer connections arrive during its own handshake.
    """

    def __init__(self, limit: int, on_evict: Callable[[], None] | None = None) -> None:
        """`limit` >= 1; `on_evict` is called once per eviction (a metric). Raises
        ValueError."""
        if limit < 1:
            raise ValueError(f"limit must be >= 1 (got {limit})")
        self.limit = limit
        self.on_evict = on_evict
        self._pending: OrderedDict[Hashable, Callable[[], None]] = OrderedDict()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, key: Hashable, abort: Callable[[], None]) -> None:
        """A new connection; evicts (aborts) the oldest pending ones beyond the limit."""
        self._pending[key] = abort
        while len(self._pending) > self.limit:
            _, oldest = self._pending.popitem(last=False)
            self.evicted += 1
            if self.on_evict is not None:
                self.on_evict()
            oldest()

    def done(self, key: Hashable) -> None:
        """The connection authenticated, was answered, or closed: it no longer counts."""
        self._pending.pop(key, None)


__all__ = ["PendingCap", "TokenBucket"]
