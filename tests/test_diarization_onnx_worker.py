"""The real worker process on the ONNX runtime: no torch or NeMo in it, the runtime choice and
its fallbacks through the engine, and a daemon labelling a session end to end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from edge.diarization.engine import DiarizationEngine
from edge.health import Status
from edge.metrics import Metrics
from tests.helpers.diarization import settings, speechlike
from tests.helpers.onnx import install_export
from tests.helpers.worker import ready, until

pytestmark = [pytest.mark.nemo, pytest.mark.slow, pytest.mark.timeout(600),
              pytest.mark.usefixtures("no_orphans")]


@pytest.fixture(scope="module")
def tiny() -> Path:
    from tests.fakes.sortformer import tiny_model_path

    return tiny_model_path()


def mapped_libraries(pid: int) -> set[str]:
    """File names of the shared objects mapped into process `pid` (from /proc/<pid>/maps)."""
    names = set()
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and ".so" in parts[5]:
                names.add(Path(parts[5]).name)
    return names


async def test_onnx_worker_has_no_torch_or_nemo(tiny: Path, tmp_path: Path) -> None:
    from edge.diarization.process import WorkerProcess
    from edge.diarization.wire import Kind

    install_export(tiny, tmp_path / "cache")
    s = settings(tmp_path / "cache", nemo_diar_model_path=tiny, edge_diarization_runtime="onnx")
    proc = await WorkerProcess.spawn()
    try:
        hello = await proc.recv()
        assert hello is not None and hello.kind is Kind.HELLO
        proc.send(Kind.LOAD, {"settings": s.model_dump(mode="json"), "generation": 0})
        while (msg := await proc.recv()) is not None and msg.kind is Kind.PROGRESS:
            pass
        assert msg is not None and msg.kind is Kind.READY, msg
        assert (msg.meta["runtime"], msg.meta["precision"], msg.meta["device"]) == ("onnx", "fp32", "cpu")
        assert msg.meta["model_rss"] > 0 and msg.meta["step_s"] > 0
        proc.send(Kind.OPEN, {"sid": "a/1"})  # no reply: the next message answers the AUDIO
        proc.send(Kind.AUDIO, {"sid": "a/1", "seq": 1}, speechlike(3.0))
        frames = await proc.recv()
        assert frames is not None and frames.kind is Kind.FRAMES and frames.array is not None
        assert len(frames.array) > 0 and frames.array.shape[1] == 4
        proc.send(Kind.STATS)
        stats = await proc.recv()
        assert stats is not None and stats.kind is Kind.STATS_REPLY
        # The worker's own view of sys.modules, and the kernel's view of what is mapped.
        assert stats.meta["imported"] == ["onnxruntime"]
        libs = mapped_libraries(proc.pid)
        assert any(name.startswith("libonnxruntime") or "onnxruntime_pybind" in name for name in libs)
        assert not [name for name in libs if "torch" in name or "c10" in name], libs
        assert await proc.stop(grace=10) == 0
    finally:
        proc.kill()
        await proc.wait()


async def make_engine(tmp_path: Path, **overrides: Any) -> DiarizationEngine:
    overrides.setdefault("edge_diarization_max_rtf", 0)
    engine = DiarizationEngine(settings(tmp_path / "cache", **overrides), Status(max_sessions=16), Metrics())
    await engine.start()
    return engine


async def test_onnx_without_an_export_is_unavailable_not_a_crash_loop(tiny: Path, tmp_path: Path) -> None:
    engine = await make_engine(tmp_path, nemo_diar_model_path=tiny, edge_diarization_runtime="onnx")
    try:
        await until(lambda: engine.state != "loading", 120, "the load to fail")
        assert engine.state == "unavailable"
        assert engine.reason is not None
        assert engine.reason.startswith("EDGE_DIARIZATION_RUNTIME=onnx but no export in ")
        await until(lambda: engine.worker_pid is None, 10, "the worker to exit")
        assert engine.restarts == 0
    finally:
        await engine.close()


async def test_auto_falls_back_to_nemo_when_the_export_is_truncated(tiny: Path, tmp_path: Path) -> None:
    folder = install_export(tiny, tmp_path / "cache")
    data = (folder / "model.onnx").read_bytes()
    (folder / "model.onnx").write_bytes(data[:1000])
    engine = await make_engine(tmp_path, nemo_diar_model_path=tiny)
    try:
        await ready(engine, 180)
        assert engine.figures["runtime"] == "nemo" and engine.figures["precision"] is None
    finally:
        await engine.close()


async def test_auto_uses_the_export_and_int8(tiny: Path, tmp_path: Path) -> None:
    install_export(tiny, tmp_path / "cache")
    for precision in ("fp32", "int8"):
        engine = await make_engine(tmp_path, nemo_diar_model_path=tiny, edge_diarization_precision=precision)
        try:
            await ready(engine, 120)
            assert (engine.figures["runtime"], engine.figures["precision"]) == ("onnx", precision)
            s = engine.open_session(f"s-{precision}")
            await until(lambda s=s: s.state == "active", 30, "the session to be admitted")
            await s.close()
        finally:
            await engine.close()


async def test_daemon_on_onnx_labels_a_session_end_to_end(tiny: Path, tmp_path: Path) -> None:
    """fake Google, chirp_3 with language auto, speaker labels from sortformer (ONNX runtime)."""
    from edge.client import stream_audio
    from tests.fakes.google_speech import encode, fake_speech, utterances
    from tests.helpers.daemon import (
        KEY,
        SR,
        appliance,
        assert_words_on_the_session_clock,
        final_words,
        samples,
        url,
    )

    install_export(tiny, tmp_path / "cache")
    audio, script = encode(utterances(4, words=4))
    async with fake_speech() as (_fake, endpoint), appliance(
        tmp_path, upstream=endpoint, edge_stt_model="chirp_3", edge_stt_language="auto",
        edge_diarization_runtime="onnx",
    ) as app:
        assert (app.engine.figures["runtime"], app.engine.figures["precision"]) == ("onnx", "fp32")
        assert (app.status.diarizer["runtime"], app.status.diarizer["precision"]) == ("onnx", "fp32")
        result = await stream_audio(url(app), samples(audio), SR, key=KEY, speed=8, query={"diarize": True})
    assert result.close_code == 1000
    words = final_words(result.messages)
    assert_words_on_the_session_clock(words, script)
    assert all(isinstance(w["speaker"], int) and 0 <= w["speaker"] < 4 for w in words), words
    finals = [m for m in result.finals if m["channel"]["alternatives"][0]["words"]]
    assert finals and all(m["speaker_source"] == "sortformer" for m in finals)
