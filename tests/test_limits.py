"""edge/limits.py without sockets: the token bucket and the pending-connection cap."""

from __future__ import annotations

import pytest

from edge.limits import PendingCap, TokenBucket


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
