"""A shortened soak (scripts/bench/soak.py runs the full hour): a long session through the
real daemon, fake Google and tiny Sortformer; nothing lost, nothing renumbered, memory flat."""

from __future__ import annotations

import pytest

from scripts.bench.soak import soak

pytestmark = [pytest.mark.nemo, pytest.mark.slow]


async def test_long_session_loses_nothing_and_stays_flat() -> None:
    r = await soak(minutes=6, speed=10, rotate_s=60)
    assert r["close"] == 1000
    assert r["words_exact"] and r["words_delivered"] == r["words_scripted"], r
    assert r["upstream_rotations"] >= 5, r  # ~6 rotations for 6 minutes at 60 s each
    assert r["words_unlabelled"] == 0, r
    assert r["diarizer_restarts"] == 0 and r["diarizer_frames_skipped"] == 0, r
    # Memory: flat within a few percent (allocator noise on a short run).
    assert r["rss_daemon_mb"]["growth_pct"] < 5, r
    assert r["rss_worker_mb"]["growth_pct"] < 5, r
