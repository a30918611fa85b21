"""The decoder process (edge/decode_process.py) and its greenlet-hosted decoder
(`InlineDecoder`, edge/decode.py): the same audio as the in-daemon decoder, and what happens
to the streams in it when it is killed or hangs."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import greenlet
import numpy as np
import pytest

from edge.audio import SessionAudio
from edge.decode import InlineDecoder, StreamDecoder
from edge.decode_process import HUNG_GRACE_S, DecoderProcess
from edge.formats import DecodeError
from edge.metrics import Metrics
from tests.test_decode import make, needs_ffmpeg

pytestmark = needs_ffmpeg


def split(data: bytes, seed: int, largest: int = 3000) -> list[bytes]:
    rng = random.Random(seed)
    out, i = [], 0
    while i < len(data):
        n = rng.randint(1, largest)
        out.append(data[i:i + n])
        i += n
    return out


async def clock_audio(audio: SessionAudio, chunks: list[bytes]) -> np.ndarray:
    """The 16 kHz int16 samples `audio` puts on the session clock for `chunks` and the end."""
    blocks = [b for chunk in chunks for b in await audio.decode(chunk)]
    blocks += await audio.finish()
    audio.close()
    return np.frombuffer(b"".join(b.pcm for b in blocks), dtype="<i2")


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
async def decoders(metrics: Metrics) -> AsyncIterator[DecoderProcess]:
    process = DecoderProcess(metrics=metrics)
    yield process
    await process.close()


@pytest.mark.parametrize(("name", "options"), [
    ("a.webm", ["-c:a", "libopus", "-b:a", "32k"]),
    ("b.ogg", ["-ac", "2", "-c:a", "libopus"]),
    ("c.mp3", ["-ar", "44100"]),
    ("d.flac", ["-ar", "16000"]),
])
async def test_the_process_puts_the_same_samples_on_the_clock(
        tmp_path: Path, decoders: DecoderProcess, name: str, options: list[str]) -> None:
    """Decoded and resampled in the decoder process, or by a thread in this one: the same
    16 kHz samples, to within one step of int16 rounding (resampled before or after the
    channels are averaged), however the bytes are cut."""
    data = make(tmp_path, name, *options, seconds=3.0)
    chunks = split(data, seed=len(name))
    remote = await clock_audio(SessionAudio(None, 16000, decoders=decoders.decoder), chunks)
    local = await clock_audio(SessionAudio(None, 16000), chunks)
    assert len(remote) == len(local) > 2.9 * 16000
    assert np.abs(remote.astype(np.int32) - local).max() <= 1
    assert decoders.starts == 1


async def test_a_killed_process_fails_its_streams_and_the_next_stream_restarts_it(
        tmp_path: Path, decoders: DecoderProcess, metrics: Metrics) -> None:
    data = make(tmp_path, "a.webm", "-c:a", "libopus", seconds=4.0)
    half = len(data) // 2
    first, second = decoders.decoder("matroska"), decoders.decoder("matroska")
    assert await first.feed(data[:half]) and await second.feed(data[:half])
    pid = decoders.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    for decoder in (first, second):
        with pytest.raises(DecodeError, match=r"decoder process exited \(signal 9\)"):
            await decoder.feed(data[half:])
    with pytest.raises(DecodeError, match="exited"):  # a failed stream stays failed
        await first.finish()
    third = decoders.decoder("matroska")
    got = sum(len(p.samples) for p in await third.feed(data)) \
        + sum(len(p.samples) for p in await third.finish())
    assert got == 4 * 16000  # resampled to the clock's rate in the process
    assert decoders.starts == 2 and decoders.pid not in (None, pid)
    assert metrics.decoder_exits.labels("crash")._value.get() == 1


async def test_a_hung_process_is_killed_after_the_budget(
        tmp_path: Path, decoders: DecoderProcess, metrics: Metrics) -> None:
    """A decoder process that stops answering (SIGSTOP: as if a call into FFmpeg never
    returned) is killed once a request outlasts its decode budget plus HUNG_GRACE_S, and
    the metric says why."""
    data = make(tmp_path, "a.webm", "-c:a", "libopus", seconds=2.0)
    decoder = decoders.decoder("matroska", feed_timeout_s=0.1)
    assert await decoder.feed(data[:len(data) // 2])
    pid = decoders.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    started = time.monotonic()
    with pytest.raises(DecodeError, match="did not answer"):
        await decoder.feed(data[len(data) // 2:])
    assert 0.1 + HUNG_GRACE_S - 0.05 <= time.monotonic() - started < 0.1 + HUNG_GRACE_S + 2
    for _ in range(100):
        if decoders.pid is None:
            break
        await asyncio.sleep(0.02)
    assert decoders.pid is None  # killed and reaped: the next stream starts a new one
    assert metrics.decoder_exits.labels("hung")._value.get() == 1


async def test_a_bad_stream_fails_alone(tmp_path: Path, decoders: DecoderProcess) -> None:
    data = make(tmp_path, "a.webm", "-c:a", "libopus", seconds=2.0)
    good, bad = decoders.decoder("matroska"), decoders.decoder("ogg")
    with pytest.raises(DecodeError, match="Ogg"):
        await bad.feed(b"OggS" + random.Random(1).randbytes(30_000))
        await bad.finish()
    got = sum(len(p.samples) for p in await good.feed(data)) \
        + sum(len(p.samples) for p in await good.finish())
    assert got == 2 * 16000
    assert good.codec == "opus"


# --- InlineDecoder ---------------------------------------------------------------------------


async def test_inline_gives_what_the_thread_gives(tmp_path: Path) -> None:
    data = make(tmp_path, "a.webm", "-c:a", "libopus", "-b:a", "32k", seconds=3.0)
    outs = []
    for kind in (InlineDecoder, StreamDecoder):
        decoder = kind("matroska")
        parts = [p for chunk in split(data, seed=5) for p in await decoder.feed(chunk)]
        parts += await decoder.finish()
        outs.append(np.concatenate([p.samples for p in parts]))
    assert np.array_equal(outs[0], outs[1])


async def test_inline_cuts_a_slow_chunk_off_at_the_next_read(tmp_path: Path) -> None:
    data = make(tmp_path, "a.webm", "-c:a", "libopus", seconds=30.0)
    decoder = InlineDecoder("matroska", feed_timeout_s=0.001)
    started = time.monotonic()
    with pytest.raises(DecodeError, match="decoder stalled"):
        await decoder.feed(data)
    assert time.monotonic() - started < 0.5  # not the whole 30 s of Opus
    with pytest.raises(DecodeError, match="decoder stalled"):
        await decoder.feed(b"more")


async def test_inline_close_unwinds_the_demuxer_quietly(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    data = make(tmp_path, "a.webm", "-c:a", "libopus", seconds=2.0)
    decoder = InlineDecoder("matroska")
    assert await decoder.feed(data[:len(data) // 2])
    demuxer = decoder._demuxer
    assert isinstance(demuxer, greenlet.greenlet) and not demuxer.dead
    decoder.close()
    assert demuxer.dead
    assert decoder._error is None
    assert capfd.readouterr().err == ""
