"""audio.py: G.711 tables against the reference codec, carry of split samples, the clock."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from edge.audio import ALAW, MULAW, SessionAudio

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    audioop = pytest.importorskip("audioop")  # the stdlib reference codec (until 3.13)


def test_g711_tables_match_reference_codec() -> None:
    codes = bytes(range(256))
    assert MULAW.tobytes() == audioop.ulaw2lin(codes, 2)
    assert ALAW.tobytes() == audioop.alaw2lin(codes, 2)


@pytest.mark.parametrize("encoding", ["mulaw", "alaw"])
def test_g711_roundtrip_is_close(encoding: str) -> None:
    t = np.arange(8000) / 8000
    pcm = (np.sin(2 * np.pi * 440 * t) * 12000).astype("<i2").tobytes()
    enc = audioop.lin2ulaw(pcm, 2) if encoding == "mulaw" else audioop.lin2alaw(pcm, 2)
    audio = SessionAudio(encoding, 8000)
    blocks = [audio.feed(enc[i:i + 160]) for i in range(0, len(enc), 160)]
    blocks.append(audio.flush())
    out = np.frombuffer(b"".join(b.pcm for b in blocks if b), dtype="<i2")
    assert abs(out.size - 16000) <= 2  # resampled 8 kHz -> the 16 kHz clock
    ref = np.sin(2 * np.pi * 440 * (np.arange(out.size) / 16000)) * 12000
    inner = slice(400, out.size - 400)
    assert np.max(np.abs(out[inner] - ref[inner])) < 800  # G.711 + resampler error


def test_odd_byte_counts_are_carried_not_dropped() -> None:
    pcm = np.arange(-500, 500, dtype="<i2").tobytes()
    audio = SessionAudio("linear16", 16000)
    out = b""
    rng = np.random.default_rng(1)
    i = 0
    while i < len(pcm):
        n = int(rng.integers(1, 37))
        block = audio.feed(pcm[i:i + n])
        if block is not None:
            assert block.start * 2 == len(out)  # blocks are contiguous on the clock
            out += block.pcm
        i += n
    assert out == pcm
    assert audio.next_sample == 1000 and audio.clock == 1000 / 16000
    assert audio.duration == 1000 / 16000
    assert audio.received_bytes == len(pcm)


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_resampled_clock_tracks_real_time(rate: int) -> None:
    audio = SessionAudio("linear16", rate)
    frame = np.zeros(rate // 10, dtype="<i2").tobytes()  # 100 ms
    for _ in range(50):
        audio.feed(frame)
    audio.flush()
    assert audio.clock == pytest.approx(5.0, abs=0.002)
    assert audio.received_at(4.95) is not None and audio.received_at(6.0) is None
