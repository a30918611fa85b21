"""Churn in CI (a shortened run of scripts/bench/churn.py): resources return to idle."""

from __future__ import annotations

from scripts.bench.churn import run

# Tolerances: fds and threads exact-ish (a keep-alive or logging fd may come and go), tasks
# exact, RSS within a few MB (allocator arenas settle in steps).
FD_SLACK, TASK_SLACK, RSS_SLACK_MB = 2, 0, 8.0


async def test_churn_returns_to_idle() -> None:
    result = await run(cycles=400, concurrency=8)
    delta = result["delta"]
    assert sum(result["cycles"].values()) == 400
    assert result["idle_after"]["sessions"] == 0
    assert delta["fds"] <= FD_SLACK, result
    assert delta["tasks"] <= TASK_SLACK, result
    assert delta["threads"] <= 0, result
    assert delta["rss_mb"] <= RSS_SLACK_MB, result
