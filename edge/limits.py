"""Per-client rate bounds, sans I/O: a token bucket, the pending-connection cap and the
failed-auth throttle.

Each bound here answers "may this client do one more X now?" from plain numbers and a clock
the caller passes in, so its tests need no server and no sleeping.
"""

from __future__ import annotations

import ipaddress
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


class AuthThrottle:
    """Failed-auth rate limit per client address (sliding window).

    More than `max_failures` failed attempts from one address within `window_s` refuses
    every request from it (HTTP 429, even with a right key, so a guesser learns nothing)
    until the window slides past them. At most `max_addresses` are tracked; the oldest is
    forgotten first, so a flood of spoofed sources costs bounded memory.
    """

    def __init__(self, max_failures: int, window_s: float, max_addresses: int = 4096) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self.max_addresses = max_addresses
        self._failures: dict[str, list[float]] = {}

    def blocked(self, address: str, now: float) -> bool:
        times = self._failures.get(address)
        if not times:
            return False
        while times and now - times[0] > self.window_s:
            times.pop(0)
        if not times:
            del self._failures[address]
            return False
        return len(times) >= self.max_failures

    def failed(self, address: str, now: float) -> None:
        times = self._failures.pop(address, [])
        times.append(now)
        del times[: max(0, len(times) - self.max_failures)]
        self._failures[address] = times  # re-insert: dict order = least recently failed first
        if len(self._failures) > self.max_addresses:
            del self._failures[next(iter(self._failures))]


def throttle_key(address: str) -> str:
    """The bucket an address's failed attempts count in: an IPv4 address itself, an IPv6
    address's /64 (one host usually holds a whole /64, so it cannot rotate through it), an
    IPv4-mapped IPv6 address as its IPv4 address."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


__all__ = ["AuthThrottle", "PendingCap", "TokenBucket", "throttle_key"]
