"""admission.py: whether local diarization runs at all (decided once), and how many sessions fit."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import pytest

from edge.app import App
from edge.device import MB
from edge.diarization.admission import Capacity, decide_availability, nemo_check
from tests.helpers.diarization import settings


@pytest.mark.parametrize(("overrides", "why"), [
    ({"stt_enable_nemo_diarization_fallback": False}, "STT_ENABLE_NEMO_DIARIZATION_FALLBACK"),
    ({"edge_stt_diarization": "off"}, "EDGE_STT_DIARIZATION=off"),
    ({"edge_stt_diarization": "google"}, "EDGE_STT_DIARIZATION=google"),
])
def test_switched_off_is_disabled_with_the_setting_named(
    tmp_path: Path, overrides: dict[str, Any], why: str,
) -> None:
    a = decide_availability(settings(tmp_path, **overrides))
    assert a.state == "disabled" and why in str(a.reason)


def test_a_missing_runtime_is_unavailable_naming_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    a = decide_availability(settings(tmp_path, edge_diarization_runtime="onnx"))
    assert (a.state, a.reason) == ("unavailable", "ONNX Runtime not available: No module named 'onnxruntime'")
    assert nemo_check(str(a.reason)) == f"NeMo not available: {a.reason}"
    monkeypatch.setitem(sys.modules, "nemo", None)
    a = decide_availability(settings(tmp_path))
    assert a.state == "unavailable" and "neither NeMo" in str(a.reason)
    assert a.nemo_error is not None and "nemo" in a.nemo_error


def test_without_nemo_the_onnx_runtime_is_available_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("onnxruntime")
    monkeypatch.setitem(sys.modules, "nemo", None)
    a = decide_availability(settings(tmp_path))
    assert a.state == "available" and a.nemo_error and "nemo" in a.nemo_error
    assert decide_availability(settings(tmp_path, edge_diarization_runtime="nemo")).state == "unavailable"


async def test_the_app_and_the_engine_read_one_decision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    app = App(settings(tmp_path, edge_diarization_runtime="onnx", edge_stt_api="none"))
    caplog.set_level(logging.INFO)
    app._report_nemo()  # the start-up step, before READY
    before = (app.status.checks["nemo"], app.status.diarizer["state"])
    monkeypatch.delitem(sys.modules, "onnxruntime")  # installed meanwhile: the decision stands
    await app.engine.start()
    assert before == (app.status.checks["nemo"], app.status.diarizer["state"])
    assert before == ("NeMo not available: ONNX Runtime not available: No module named 'onnxruntime'",
                      "unavailable")
    assert app.engine.final and app.engine.worker_pid is None
    assert "NeMo diarization fallback disabled: ONNX Runtime not available" in caplog.text
    await app.engine.close()


def test_a_disabled_engine_starts_no_worker_and_the_app_logs_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    app = App(settings(tmp_path, stt_enable_nemo_diarization_fallback=False, edge_stt_api="none"))
    app._report_nemo()
    assert app.status.checks["nemo"] == "disabled" and "NeMo" not in caplog.text


FIG = {"session_bytes": 1 * MB, "model_rss": 300 * MB, "step_peak": 100 * MB, "rtf": 0.1,
       "device": "cpu"}


def test_memory_binds_when_it_fits_fewer_sessions() -> None:
    c = Capacity(budget=500 * MB, session_mb=20, max_rtf=0.9)
    assert c.measured(FIG) is None
    assert c.sessions == 5 and c.figures["memory_capacity"] == 5 and c.figures["compute_capacity"] == 9
    assert c.refusal() == ("local diarization at capacity: 5 session(s) of 20 MB fit "
                           "EDGE_DIARIZATION_MEMORY_MB=500")


def test_compute_binds_and_a_faster_live_rtf_admits_more() -> None:
    c = Capacity(budget=4000 * MB, session_mb=20, max_rtf=0.9)
    c.measured({**FIG, "rtf": 0.3})
    assert c.sessions == 3 and "keep up in real time on cpu (RTF 0.300" in c.refusal()
    assert c.rtf(0.1) is True and c.sessions == 9
    assert c.rtf(0.2) is False and c.sessions == 4  # shrinks; admitted sessions stay (engine)


def test_no_compute_limit_when_max_rtf_is_zero() -> None:
    c = Capacity(budget=4000 * MB, session_mb=20, max_rtf=0)
    c.measured({**FIG, "rtf": 5.0})
    assert c.sessions == c.figures["memory_capacity"] == (4000 - 400) // 20


def test_a_model_that_fits_no_session_says_which_budget() -> None:
    c = Capacity(budget=410 * MB, session_mb=20, max_rtf=0.9)
    why = c.measured(FIG)
    assert why == ("model needs 400 MB + 20 MB per session: "
                   "EDGE_DIARIZATION_MEMORY_MB=410 fits no session")
    assert c.sessions == 0

