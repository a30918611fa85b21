"""edge/limits.py without sockets: token bucket, pending-connection cap, auth throttle."""

from __future__ import annotations

import pytest

from edge.limits import AuthThrottle, PendingCap, TokenBucket, throttle_key


def test_token_bucket_allows_the_burst_then_the_rate() -> None:
    b = TokenBucket(rate=10, burst=5, now=0.0)
    assert [b.take(0.0) for _ in range(6)] == [True] * 5 + [False]
    assert not b.take(0.05)  # half a token back
    assert b.take(0.1)
    assert not b.take(0.1)
    assert [b.take(100.0) for _ in range(6)] == [True] * 5 + [False]  # refills to burst only


def test_token_bucket_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate=0, burst=1, now=0)


def test_pending_cap_evicts_the_oldest() -> None:
    aborted: list[int] = []
    evictions: list[None] = []
    cap = PendingCap(3, on_evict=lambda: evictions.append(None))
    for i in range(3):
        cap.add(i, lambda i=i: aborted.append(i))
    cap.done(1)
    cap.add(3, lambda: aborted.append(3))
    assert aborted == [] and len(cap) == 3
    cap.add(4, lambda: aborted.append(4))
    cap.add(5, lambda: aborted.append(5))
    assert aborted == [0, 2] and len(cap) == 3 and cap.evicted == len(evictions) == 2
    cap.done(99)  # unknown: no effect
    assert len(cap) == 3


def test_auth_throttle_blocks_within_its_window_and_evicts_the_oldest_address() -> None:
    t = AuthThrottle(max_failures=3, window_s=10, max_addresses=2)
    for i in range(3):
        assert not t.blocked("a", i)
        t.failed("a", i)
    assert t.blocked("a", 3) and not t.blocked("b", 3)
    assert t.blocked("a", 9.5)  # all three failures still inside the window
    assert not t.blocked("a", 10.5)  # the first one slid out: 2 < 3
    # bounded memory: a third address evicts the least recently failed one
    t.failed("a", 20)
    t.failed("b", 21)
    t.failed("c", 22)
    assert set(t._failures) == {"b", "c"}


def test_ipv6_failures_count_per_64_so_a_host_cannot_rotate_through_its_prefix() -> None:
    assert throttle_key("2001:db8:1:2::1") == throttle_key("2001:db8:1:2:ffff::9")
    assert throttle_key("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert throttle_key("2001:db8:1:3::1") != throttle_key("2001:db8:1:2::1")
    assert throttle_key("::ffff:192.0.2.7") == throttle_key("192.0.2.7") == "192.0.2.7"
    assert throttle_key("fe80::1%eth0") == "fe80::/64"
    t = AuthThrottle(max_failures=3, window_s=10)
    for i in range(3):
        t.failed(throttle_key(f"2001:db8::{i + 1:x}"), 0)
    assert t.blocked(throttle_key("2001:db8::ffff"), 1)
