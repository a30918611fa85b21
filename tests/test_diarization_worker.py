"""The worker's loop (edge/diarization/worker/main.py) on its own, spoken to over its pipes in the
wire protocol, on the real tiny model. Every test checks that no worker process outlives it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.diarization import settings, speechlike
from tests.helpers.worker import engine_test

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("no_orphans")]


@engine_test
async def test_the_worker_answers_load_open_audio_stats_and_close_then_exits(
    tiny_model: Path, tmp_path: Path,
) -> None:
    """The worker on its own: hello, load, open, audio -> frames, stats, errors, close, exit."""
    from edge.diarization.process import WorkerProcess
    from edge.diarization.wire import Kind

    proc = await WorkerProcess.spawn()
    try:
        hello = await proc.recv()
        assert hello is not None and hello.kind is Kind.HELLO and hello.meta["pid"] == proc.pid
        s = settings(tmp_path, nemo_diar_model_path=tiny_model)
        proc.send(Kind.LOAD, {"settings": s.model_dump(mode="json"), "generation": 0})
        phases = []
        while (msg := await proc.recv()) is not None and msg.kind is Kind.PROGRESS:
            phases.append(msg.meta["phase"])
        assert phases == ["import", "load", "warmup"]
        assert msg is not None and msg.kind is Kind.READY, msg
        assert {"model_rss", "step_peak", "session_bytes", "step_s", "device"} <= set(msg.meta)
        proc.send(Kind.OPEN, {"sid": "a/1"})  # no reply: the next message answers the AUDIO
        audio = speechlike(3.0)
        proc.send(Kind.AUDIO, {"sid": "a/1", "seq": 1}, audio)
        frames = await proc.recv()
        assert frames is not None and frames.kind is Kind.FRAMES and frames.meta["seq"] == 1
        assert frames.meta["first"] == 0 and frames.array is not None and frames.array.shape[1] == 4
        proc.send(Kind.AUDIO, {"sid": "nope/0", "seq": 7}, audio[:100])
        err = await proc.recv()
        assert err is not None and err.kind is Kind.ERROR and err.meta["seq"] == 7
        proc.send(Kind.STATS)
        stats = await proc.recv()
        assert stats is not None and stats.kind is Kind.STATS_REPLY and stats.meta["streams"] == 1
        proc.send(Kind.CLOSE, {"sid": "a/1"})
        closed = await proc.recv()
        assert closed is not None and closed.kind is Kind.CLOSED and closed.array is not None
        assert closed.meta["first"] == len(frames.array)
        assert len(frames.array) + len(closed.array) == 38  # ceil(3 s / 80 ms): the tail is padded
        assert await proc.stop(grace=10) == 0
    finally:
        proc.kill()
        await proc.wait()
