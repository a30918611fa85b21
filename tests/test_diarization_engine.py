"""The diarization engine (edge/diarization/engine.py) with a real supervised worker process, the
real tiny model and injected faults: admission, degradation, restarts, skipping ahead.

Faults come from the worker's own test-only hook (`EDGE_DIARIZATION_FAULTS`, see
`edge.diarization.worker.Faults`) or from the outside (SIGKILL). Nothing of ours is mocked.
Every test checks that no worker process outlives it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edge.clock import AudioBlock
from edge.diarization.engine import DiarizationEngine
from edge.health import Status
from edge.metrics import Metrics
from tests.helpers.daemon import ROOT
from tests.helpers.diarization import SR, settings
from tests.helpers.worker import Talker, engine_test, labels_flow, ready, restarts, until

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("no_orphans")]


@engine_test
async def test_labels_flow_and_close_flushes_the_stream(make_engine: Callable[..., Any]) -> None:
    engine = await make_engine()
    early = engine.open_session("early")  # opened while loading: admitted once ready
    assert early.state == "unavailable" and early.reason == "diarizer loading"
    assert engine.healthy()
    await ready(engine)
    assert early.state == "active"
    f = engine.figures
    assert f["device"] == "cpu" and f["model_rss"] > 100 * 2**20 and f["session_bytes"] > 0
    assert engine.status.checks["nemo"] == "ok"
    d = engine.status.diarizer
    assert d["state"] == "ready" and d["capacity"] == engine.capacity > 0 and d["device"] == "cpu"
    talker = Talker(early)
    await talker.talk(6.0)
    assert await early.wait_covered(3.0, timeout=10)
    speaker, conf = early.timeline.speaker_for(2.0, 2.5)
    assert (speaker is None or 0 <= speaker < 4) and 0.0 <= conf <= 1.0
    assert not await early.wait_covered(1000.0, timeout=0.2)  # bounded wait
    await early.close()
    assert early.state == "closed"
    # finish() flushed the tail: the timeline reaches the last full frame of the audio
    assert early.timeline.covered_until >= talker.t - 0.08
    await early.close()  # idempotent
    await until(lambda: engine.status.diarizer["sessions"] == 0, 3, "the slot to be freed")
    assert engine.metrics.diarizer_step._sum.get() > 0
    assert engine.worker.rss > 100 * 2**20
    # The watchdog decision: healthy while the supervisor ticks, not once it stops.
    assert engine.healthy()
    engine._tasks[1].cancel()  # the engine's tick dying = a wedged supervisor
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert not engine.healthy()


@engine_test
async def test_budget_refuses_beyond_capacity_and_admits_when_a_slot_frees(
    make_engine: Callable[..., Any],
) -> None:
    # (8192 - model) // 2048 == 3 for any model + step peak under 2048 MB.
    engine = await make_engine(edge_diarization_memory_mb=8192, edge_diarization_session_mb=2048)
    await ready(engine)
    assert engine.capacity == 3
    sessions = [engine.open_session(f"s{i}") for i in range(4)]
    assert [s.state for s in sessions] == ["active", "active", "active", "refused"]
    fourth = sessions[3]
    assert fourth.reason is not None and "capacity" in fourth.reason and "8192" in fourth.reason
    assert engine.status.diarizer["sessions"] == 3 and engine.status.diarizer["capacity"] == 3
    talkers = [Talker(s, seed=i) for i, s in enumerate(sessions)]
    await asyncio.gather(*(t.talk(3.0) for t in talkers))
    assert fourth.timeline.covered_until == 0.0  # refused: no labels, audio dropped
    assert not await fourth.wait_covered(1.0, timeout=0.5)
    await sessions[0].close()
    assert fourth.state == "active"  # the freed slot goes to the waiting session at once
    await labels_flow(talkers[3])
    assert fourth.timeline.speaker_for(0.5, 1.0) == (None, 0.0)  # audio before admission
    assert engine.open_session("s4").state == "refused"


@engine_test
async def test_admission_stops_where_the_worker_could_not_keep_up(make_engine: Callable[..., Any]) -> None:
    # A slow device: warm-up steps of 0.7 s+ for 2 s chunks (RTF >= 0.35).
    engine = await make_engine(edge_diarization_max_rtf=0.9,
                               edge_diarization_faults="warmup_sleep:seconds=0.7,count=5")
    await ready(engine)
    f = dict(engine.figures)
    assert f["rtf"] >= 0.35 and f["memory_capacity"] > 50
    assert engine.capacity == f["compute_capacity"] == max(1, int(0.9 / f["rtf"])) <= 2
    sessions = [engine.open_session(f"s{i}") for i in range(engine.capacity + 1)]
    assert [s.state for s in sessions[:-1]] == ["active"] * engine.capacity
    assert sessions[-1].state == "refused"
    assert "keep up in real time on cpu" in (sessions[-1].reason or "")
    # The live steps are fast (no sleep outside warm-up): the next STATS raises the estimate
    # and the waiting session is admitted.
    talkers = [Talker(s, seed=i) for i, s in enumerate(sessions[:-1])]
    deadline = time.monotonic() + 60
    while sessions[-1].state != "active":
        assert time.monotonic() < deadline, "the live RTF never replaced the warm-up's"
        await asyncio.gather(*(t.talk(1.0) for t in talkers))
    assert engine.capacity >= len(sessions) and engine.figures["rtf_estimate"] < f["rtf"]


@engine_test
async def test_a_failing_step_degrades_that_session_then_its_labels_come_back(
    make_engine: Callable[..., Any],
) -> None:
    engine = await make_engine(edge_diarization_faults="step_raise:session=bad,after=5")
    await ready(engine)
    bad, good = engine.open_session("bad"), engine.open_session("good")
    tb, tg = Talker(bad), Talker(good, seed=1)
    await asyncio.gather(tb.talk(4.0), tg.talk(4.0))
    await until(lambda: ("degraded", "diarizer step failed: injected fault: step_raise") in bad.history,
                10, "the failing step to degrade the session")
    assert any("step failed" in n["message"] for n in engine.status.notices)
    await asyncio.gather(labels_flow(tb), labels_flow(tg))
    assert bad.state == good.state == "active"
    assert ("degraded", None) not in good.history and good.history[-1] == ("active", None)
    assert restarts(engine, "errors") == 0 and engine.worker_pid is not None


@engine_test
async def test_a_hung_step_degrades_then_the_stuck_worker_is_restarted(
    make_engine: Callable[..., Any],
) -> None:
    engine = await make_engine(stt_nemo_diarization_timeout_s=1.0,
                               edge_diarization_faults="step_sleep:session=s,after=20,seconds=60")
    await ready(engine)
    s = engine.open_session("s")
    talker = Talker(s)
    first_pid = engine.worker_pid
    while s.state == "active":
        await talker.talk(0.5)
    assert s.reason == "diarizer step slower than 1 s"
    assert engine.status.diarizer["state"] == "degraded"
    assert not await s.wait_covered(talker.t, timeout=1)  # labels null while degraded
    assert engine.healthy()  # the daemon keeps its watchdog going meanwhile
    # stuck after 3 x 1 s: killed and restarted; the session keeps going without labels
    await until(lambda: restarts(engine, "stuck") == 1, 10, "the stuck worker to be killed")
    assert s.state == "degraded" and "stuck" in (s.reason or "")
    while engine.state != "ready":  # audio keeps coming while the worker restarts
        await talker.talk(0.5)
    assert engine.worker_pid != first_pid
    await labels_flow(talker)
    assert s.state == "active" and engine.status.diarizer["restarts"] == 1


@engine_test
async def test_a_killed_worker_is_detected_at_once_restarted_and_labels_come_back(
    make_engine: Callable[..., Any],
) -> None:
    engine = await make_engine()
    await ready(engine)
    s = engine.open_session("s")
    talker = Talker(s)
    await labels_flow(talker)
    known = s.timeline.speakers
    assert known > 0
    pid = engine.worker_pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)  # what the OOM killer does
    t0 = time.monotonic()
    await until(lambda: s.state == "degraded", 2, "the session to notice the worker died")
    assert time.monotonic() - t0 < 1.0
    assert s.reason == "diarizer worker killed by SIGKILL; restarting"
    assert engine.status.diarizer["state"] == "degraded"
    late = engine.open_session("late")  # opened during the restart: waits for the new worker
    assert late.state == "unavailable" and late.reason == "diarizer restarting"
    while engine.state != "ready":
        await talker.talk(0.5)
    back = talker.t
    await labels_flow(talker)
    await talker.talk(2.0)
    # The new stream's speakers got new numbers: none of the old ones names a new voice.
    assert s.timeline.speakers > known
    assert s.timeline.speaker_for(back, talker.t - 0.5)[0] in (None, *range(known, s.timeline.speakers))
    assert late.state == "active"
    assert restarts(engine, "crash") == 1 and engine.worker_pid not in (None, pid)
    assert any("SIGKILL" in n["message"] for n in engine.status.notices)


@engine_test
async def test_a_worker_killed_by_a_realtime_signal_is_restarted(make_engine: Callable[..., Any]) -> None:
    """Signal 35 has no name in Python's `signal.Signals`: supervision must survive it."""
    engine = await make_engine(edge_api_keys="k-secret-1", edge_host="0.0.0.0")
    await ready(engine)
    s = engine.open_session("s")
    talker = Talker(s)
    await labels_flow(talker)
    pid = engine.worker_pid
    assert pid is not None
    os.kill(pid, 35)  # SIGRTMIN+1 on glibc (kill -35)
    await until(lambda: s.state == "degraded", 2, "the session to notice the worker died")
    assert s.reason == "diarizer worker killed by signal 35; restarting"
    while engine.state != "ready":
        await talker.talk(0.5)
    await labels_flow(talker)
    assert restarts(engine, "crash") == 1 and engine.worker_pid not in (None, pid)


@engine_test
async def test_worker_over_its_memory_budget_is_restarted(make_engine: Callable[..., Any]) -> None:
    # The tiny model's worker is ~0.7 GB; 1024 MB fits it and a few 64 MB sessions. The fault
    # leaks 800 MB in one step: far past 1024 + 102 MB.
    engine = await make_engine(edge_diarization_memory_mb=1024, edge_diarization_session_mb=64,
                               edge_diarization_faults="step_alloc:session=s,after=10,mb=800")
    await ready(engine)
    s = engine.open_session("s")
    talker = Talker(s)
    while restarts(engine, "memory") == 0:
        await talker.talk(0.5)
        assert talker.t < 60, "the worker was not restarted for its memory"
    while engine.state != "ready":
        await talker.talk(0.5)
    await labels_flow(talker)
    assert 0 < engine.worker.rss < 1024 * 2**20


@engine_test
async def test_a_corrupt_model_makes_the_diarizer_unavailable_not_the_daemon(
    make_engine: Callable[..., Any], tmp_path: Path,
) -> None:
    bad = tmp_path / "broken.nemo"
    bad.write_bytes(b"this is not a tar archive" * 100)
    engine = await make_engine(nemo_diar_model_path=bad)
    s = engine.open_session("s")
    await until(lambda: engine.state != "loading", 60, "the load to fail")
    assert engine.state == "unavailable"
    assert engine.reason is not None and "broken.nemo" in engine.reason
    assert s.state == "unavailable" and s.reason == engine.reason
    later = engine.open_session("later")
    assert later.state == "unavailable" and later.reason == engine.reason
    later.push(AudioBlock(0, b"\0\0" * 1600))  # harmless
    assert not await later.wait_covered(0.05, timeout=0.1)
    await later.close()
    assert engine.status.diarizer["state"] == "unavailable"
    assert engine.status.checks["nemo"].startswith("NeMo not available: ")
    assert engine.healthy()
    await until(lambda: engine.worker_pid is None, 10, "the worker to exit")
    assert engine.restarts == 0  # a model that cannot load is not retried in a loop


@pytest.mark.parametrize(("overrides", "why"), [
    ({"stt_enable_nemo_diarization_fallback": False}, "STT_ENABLE_NEMO_DIARIZATION_FALLBACK"),
    ({"edge_stt_diarization": "off"}, "EDGE_STT_DIARIZATION=off"),  # nobody labels speakers
    ({"edge_stt_diarization": "google"}, "EDGE_STT_DIARIZATION=google"),
])
async def test_disabled_fallback_spawns_nothing(tmp_path: Path, overrides: dict[str, Any],
                                                why: str) -> None:
    engine = DiarizationEngine(settings(tmp_path, **overrides), Status(max_sessions=4), Metrics())
    await engine.start()
    s = engine.open_session("x")
    assert s.state == "unavailable" and why in (s.reason or "")
    assert engine.worker_pid is None and engine.healthy()
    assert engine.status.checks["nemo"] == "disabled"
    await s.close()
    await engine.close()


def test_the_daemon_side_never_imports_torch_or_nemo() -> None:
    code = ("import sys, edge.diarization.engine, edge.diarization.session; "
            "bad = [m for m in ('torch', 'nemo') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


@engine_test
async def test_falling_behind_real_time_skips_to_the_newest_audio(make_engine: Callable[..., Any]) -> None:
    # One 4 s stall; 2 s of backlog allowed: the session skips ahead instead of queueing.
    engine = await make_engine(edge_diarization_max_backlog_s=2.0,
                               edge_diarization_faults="step_sleep:session=s,after=10,seconds=4")
    await ready(engine)
    s = engine.open_session("s")
    talker = Talker(s)
    while not s.feed.skipped:
        await talker.talk(0.5, speed=2.0)
        assert talker.t < 60, "never fell behind"
        assert s.feed.pending_samples <= 2.0 * SR + 0.1 * SR  # the backlog bound holds
    a, b = s.feed.skipped[0]
    assert s.state == "active"  # a stall shorter than the timeout: labels stay on
    assert not await s.wait_covered((a + b) / 2, timeout=5)  # skipped audio: no waiting
    await labels_flow(talker)
    assert s.timeline.speaker_for(a, b) == (None, 0.0)  # the skipped span stays unlabelled
    assert engine.metrics.queue_dropped.labels("diarizer")._value.get() == s.feed.skipped_frames > 0
    assert any("behind real time" in n["message"] for n in engine.status.notices)
    assert restarts(engine, "stuck") == 0
