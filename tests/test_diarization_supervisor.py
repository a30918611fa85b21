"""The worker supervisor (edge/diarization/supervisor.py): its restart decisions on their own
(sans-I/O `RestartPolicy`), its states, what it sends the worker, what a restart reuses, and
spawns that fail and are retried. Every test checks that no worker process outlives it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edge.diarization.supervisor import (
    BACKOFF_S,
    HEALTHY_RUN_S,
    MAX_START_FAILURES,
    RestartPolicy,
    WorkerState,
    WorkerSupervisor,
)
from edge.metrics import Metrics
from tests.helpers.daemon import ROOT
from tests.helpers.diarization import settings
from tests.helpers.worker import engine_test, ready, restarts, until

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("no_orphans")]


def test_worker_settings_drop_the_api_keys_and_keep_the_hf_token(tmp_path: Path) -> None:
    import json

    from edge.diarization.supervisor import worker_settings

    s = settings(tmp_path, edge_api_keys="k-secret-1,k-secret-2", edge_host="0.0.0.0",
                 hf_token="hf_abc")
    payload = worker_settings(s)
    assert "k-secret" not in json.dumps(payload)
    assert payload["hf_token"] == "hf_abc"  # the worker downloads the model with it
    # The worker can rebuild its settings from it: no keys and a loopback host are valid.
    from edge.settings import Settings

    assert Settings(_env_file=None, **payload).nemo_cache_dir == tmp_path  # type: ignore[call-arg]


@engine_test
def test_a_failed_spawn_is_retried_not_final(tiny_model: Path, tmp_path: Path) -> None:
    """A child daemon whose file descriptor limit is too low to make the worker's pipes
    (EMFILE, as under a flood of connections): the supervisor keeps retrying, and once the
    limit is back the worker starts."""
    code = f"""
import asyncio, json, os, resource
from edge.diarization.supervisor import WorkerSupervisor
from edge.metrics import Metrics
from tests.helpers.diarization import settings

events = []
class Handler:
    def on_message(self, msg): pass
    def on_ready(self, figures): events.append("ready")
    def on_lost(self, reason): events.append("lost: " + reason)
    def on_final(self, reason): events.append("final: " + reason)
    def on_progress(self): pass

async def main():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 1, hard))
    s = settings({str(tmp_path / "cache")!r}, nemo_diar_model_path={str(tiny_model)!r},
                 edge_diarization_max_rtf=0)
    sup = WorkerSupervisor(s, Metrics(), Handler())
    task = sup.start()
    while len(events) < 2:  # two failed spawns, 0.5 s apart
        await asyncio.sleep(0.01)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    for _ in range(2400):
        if "ready" in events or any(e.startswith("final") for e in events):
            break
        await asyncio.sleep(0.05)
    await sup.stop()
    await task
    print(json.dumps(events))

asyncio.run(main())
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr
    import json

    events = json.loads(proc.stdout.splitlines()[-1])
    assert events[:2] == ["lost: worker could not start: Too many open files"] * 2, events
    assert events[-1] == "ready", events


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


@engine_test
@pytest.mark.timeout(480)
async def test_a_restart_reuses_the_warm_up_at_once_and_a_crash_loop_backs_off(
    make_engine: Callable[..., Any], tiny_model: Path, tmp_path: Path,
) -> None:
    """A worker that was ready is restarted at once the first time it dies, and its successor
    takes the warm-up figures instead of stepping the model; dying again right away is a crash
    loop and waits; after the model file is written the warm-up is measured again."""
    import shutil

    from edge.diarization.worker.main import WARMUP_FIGURES

    model = tmp_path / "model.nemo"
    shutil.copy(tiny_model, model)
    engine = await make_engine(nemo_diar_model_path=model)
    await ready(engine, 180)
    first = dict(engine.figures)
    assert first["warmup_reused"] is False
    assert list(first["phases"]) == ["boot", "settings", "resolve", "plan", "open", "warmup"]
    assert sum(first["phases"].values()) <= first["spawn_to_ready_s"] + 0.01
    assert first["phases_cpu"]["boot"] > 0 and first["phases_cpu"]["warmup"] > 0

    async def kill_and_restart() -> dict[str, Any]:
        pid = engine.worker_pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        await until(lambda: engine.state == "degraded", 5, "the engine to see the worker die")
        await until(lambda: engine.state == "ready", 180, "the worker to be back")
        assert engine.worker_pid != pid
        return dict(engine.figures)

    second = await kill_and_restart()
    assert engine.worker.last_backoff_s == 0.0
    assert second["warmup_reused"] is True and "warmup" in second["phases"]
    assert {k: second[k] for k in WARMUP_FIGURES} == {k: first[k] for k in WARMUP_FIGURES}
    assert second["model_rss"] > 0  # measured by the new worker itself
    os.utime(model)  # written since (same bytes): its identity moved, so the figures may not hold
    third = await kill_and_restart()
    assert engine.worker.last_backoff_s == BACKOFF_S[0]  # the second quick death in a row
    assert third["warmup_reused"] is False
    assert restarts(engine, "crash") == 2
