"""The engine's own state (`EngineState`): transitions it allows and refuses, without a worker.

The paths through a live worker (LOADING -> READY -> DEGRADED -> READY, UNAVAILABLE on a broken
model) are exercised with the real worker in the engine's worker tests.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from edge.diarization.engine import DiarizationEngine, EngineState, InvalidEngineTransition
from edge.diarization.session import DiarizerState
from edge.health import Status
from edge.metrics import Metrics
from tests.diarization_helpers import settings

READY_FIGURES = {"session_bytes": 2**20, "model_rss": 2**20, "step_peak": 0, "rtf": 0.1,
                 "device": "cpu", "step_s": 0.03}


def engine(tmp_path: Path, **overrides: object) -> DiarizationEngine:
    return DiarizationEngine(settings(tmp_path, **overrides), Status(max_sessions=4), Metrics())


def test_worker_events_before_start_are_refused_and_change_nothing(tmp_path: Path) -> None:
    e = engine(tmp_path)
    with pytest.raises(InvalidEngineTransition) as err:
        e.on_lost("worker exited")  # no worker was ever started
    assert (err.value.state, err.value.to) == (EngineState.NEW, EngineState.DEGRADED)
    with pytest.raises(InvalidEngineTransition):
        e.on_ready(dict(READY_FIGURES))
    assert e.state is EngineState.NEW and not e.final


async def test_disabled_is_final_and_ignores_a_late_worker_event(tmp_path: Path) -> None:
    e = engine(tmp_path, stt_enable_nemo_diarization_fallback=False)
    await e.start()
    assert e.state is EngineState.DISABLED and e.final
    e.on_final("model broken")  # nothing can follow a final state
    e.on_lost("worker exited")
    assert e.state is EngineState.DISABLED and "STT_ENABLE_NEMO_DIARIZATION_FALLBACK" in str(e.reason)
    await e.close()
    assert e.state is EngineState.DISABLED
    s = e.open_session("late")
    assert s.state is DiarizerState.UNAVAILABLE and s.reason == e.reason


async def test_unavailable_at_start_tells_the_sessions_already_waiting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    e = engine(tmp_path, edge_diarization_runtime="onnx")
    early = e.open_session("early")
    assert early.state is DiarizerState.UNAVAILABLE and early.reason == "diarizer loading"
    await e.start()
    assert e.state is EngineState.UNAVAILABLE and e.worker_pid is None
    assert early.reason == e.reason == "ONNX Runtime not available: No module named 'onnxruntime'"
    assert e.status.diarizer["state"] == "unavailable"
    await early.close()
    assert early.state is DiarizerState.CLOSED
    await e.close()


async def test_a_closed_engine_cannot_start_and_serves_no_session(tmp_path: Path) -> None:
    e = engine(tmp_path)
    waiting = e.open_session("waiting")
    await e.close()
    assert e.state is EngineState.CLOSED and not e.final and e.healthy()
    assert waiting.state is DiarizerState.CLOSED
    await e.start()  # too late: nothing is spawned
    assert e.state is EngineState.CLOSED and e.worker_pid is None
    e.on_ready(dict(READY_FIGURES))  # a READY racing the shutdown is dropped
    assert e.state is EngineState.CLOSED
    s = e.open_session("after")
    assert s.state is DiarizerState.UNAVAILABLE and s.reason == "diarizer shut down"
    await waiting.close()  # a client closing after the engine: nothing left to do
    assert waiting.state is DiarizerState.CLOSED
