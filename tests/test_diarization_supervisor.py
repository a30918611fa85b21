"""The supervisor's decisions on their own (sans-I/O): when the next worker starts, and which
state changes it allows. The supervisor with a real worker is in test_diarization_worker.py."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from edge.diarization.supervisor import (
    BACKOFF_S,
    HEALTHY_RUN_S,
    MAX_START_FAILURES,
    RestartPolicy,
    WorkerState,
    WorkerSupervisor,
)
from edge.metrics import Metrics
from tests.diarization_helpers import settings

QUICK = 5.0  # seconds of READY: less than a healthy run


def test_a_worker_that_was_ready_is_restarted_at_once_the_first_time() -> None:
    p = RestartPolicy()
    assert p.after_exit(ready_for=QUICK) == 0.0
    assert p.after_exit(ready_for=HEALTHY_RUN_S) == 0.0
    assert p.after_exit(ready_for=QUICK) == 0.0  # the healthy run wiped the slate


def test_workers_that_keep_dying_soon_after_ready_back_off_until_a_healthy_run() -> None:
    p = RestartPolicy()
    waits = [p.after_exit(ready_for=QUICK) for _ in range(len(BACKOFF_S) + 3)]
    assert waits == [0.0, *BACKOFF_S, BACKOFF_S[-1], BACKOFF_S[-1]]
    assert p.after_exit(ready_for=HEALTHY_RUN_S + 1) == 0.0
    assert [p.after_exit(ready_for=QUICK) for _ in range(2)] == [0.0, BACKOFF_S[0]]


def test_starts_that_never_reach_ready_back_off_then_give_up() -> None:
    p = RestartPolicy()
    waits = [p.after_exit(ready_for=None) for _ in range(MAX_START_FAILURES)]
    assert waits == [*BACKOFF_S[: MAX_START_FAILURES - 1], None]


def test_a_start_that_reaches_ready_resets_the_count_towards_giving_up_not_the_backoff() -> None:
    p = RestartPolicy()
    for _ in range(MAX_START_FAILURES - 1):
        assert p.after_exit(ready_for=None) is not None
    # It loaded once, then died at once: not a failed start, but the crash loop goes on.
    assert p.after_exit(ready_for=0.1) == BACKOFF_S[MAX_START_FAILURES - 2]
    assert all(p.after_exit(ready_for=None) is not None for _ in range(MAX_START_FAILURES - 1))
    assert p.after_exit(ready_for=None) is None


def test_failed_spawns_back_off_forever_and_a_spawn_that_works_clears_them() -> None:
    p = RestartPolicy()
    waits = [p.after_spawn_failure() for _ in range(MAX_START_FAILURES + len(BACKOFF_S))]
    assert waits[: len(BACKOFF_S)] == list(BACKOFF_S) and set(waits[len(BACKOFF_S):]) == {BACKOFF_S[-1]}
    assert p.after_exit(ready_for=QUICK) == 0.0  # never counted towards giving up
    assert p.after_spawn_failure() == BACKOFF_S[0]


class Events:
    """A `Handler` that records what the supervisor tells the engine."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def on_message(self, msg: Any) -> None:
        self.seen.append(f"message {msg.kind.name}")

    def on_ready(self, figures: dict[str, Any]) -> None:
        self.seen.append("ready")

    def on_lost(self, reason: str) -> None:
        self.seen.append(f"lost: {reason}")

    def on_final(self, reason: str) -> None:
        self.seen.append(f"final: {reason}")

    def on_progress(self) -> None:
        pass


async def test_a_stopped_supervisor_starts_nothing_and_does_not_give_up_afterwards(tmp_path: Path) -> None:
    events = Events()
    sup = WorkerSupervisor(settings(tmp_path), Metrics(), events)
    await sup.stop()
    assert sup.state is WorkerState.CLOSED
    await asyncio.wait_for(sup.start(), 5)  # returns at once: no worker is spawned
    assert sup.pid is None and sup.restarts == 0
    sup.give_up("too late")
    assert sup.state is WorkerState.CLOSED and events.seen == []


async def test_giving_up_is_final_once_and_then_closes(tmp_path: Path) -> None:
    events = Events()
    sup = WorkerSupervisor(settings(tmp_path), Metrics(), events)
    sup.give_up("model does not fit")
    sup.give_up("again")
    assert sup.state is WorkerState.FINAL and not sup.ready
    assert events.seen == ["final: model does not fit"]
    await asyncio.wait_for(sup.start(), 5)
    assert sup.pid is None
    await sup.stop()
    assert sup.state is WorkerState.CLOSED
