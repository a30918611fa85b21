"""audio.py: G.711 tables against the reference codec, carry of split samples, the clock."""

from __future__ import annotations

import hashlib
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
    blocks = [b for i in range(0, len(enc), 160) for b in audio.feed(enc[i:i + 160])]
    blocks += audio.flush()
    out = np.frombuffer(b"".join(b.pcm for b in blocks), dtype="<i2")
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
        for block in audio.feed(pcm[i:i + n]):
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


@pytest.mark.parametrize("rate", [16000, 8000])
def test_stereo_splits_into_two_channels_on_one_clock(rate: int) -> None:
    n = rate  # 1 s
    left = (np.sin(2 * np.pi * 300 * np.arange(n) / rate) * 9000).astype("<i2")
    right = np.full(n, -1234, dtype="<i2")
    interleaved = np.stack([left, right], axis=1).reshape(-1).tobytes()
    audio = SessionAudio("linear16", rate, channels=2, split=True)
    outs: list[list[bytes]] = [[], []]
    rng = np.random.default_rng(3)
    i = 0
    while i < len(interleaved):
        k = int(rng.integers(1, 999))  # frames split anywhere, even inside a sample
        blocks = audio.feed(interleaved[i:i + k]) if i + k < len(interleaved) else (
            audio.feed(interleaved[i:i + k]) + audio.flush())
        for blocks_ in ([blocks[0::2], blocks[1::2]] if len(blocks) == 4 else [blocks]):
            if blocks_:
                assert len(blocks_) == 2 and blocks_[0].start == blocks_[1].start
                outs[0].append(blocks_[0].pcm)
                outs[1].append(blocks_[1].pcm)
        i += k
    first, second = (np.frombuffer(b"".join(o), dtype="<i2") for o in outs)
    assert len(first) == len(second) and abs(len(first) - 16000) <= 2
    assert audio.duration == pytest.approx(1.0)
    assert np.abs(second[200:-200] + 1234).max() <= 40  # the right channel alone
    assert np.abs(first[200:-200]).max() > 8000  # the left channel's tone


def test_stereo_without_multichannel_is_downmixed() -> None:
    left = np.full(1600, 1000, dtype="<i2")
    right = np.full(1600, 3000, dtype="<i2")
    audio = SessionAudio("linear16", 16000, channels=2)
    blocks = audio.feed(np.stack([left, right], axis=1).reshape(-1).tobytes())
    assert len(blocks) == 1
    assert set(np.frombuffer(blocks[0].pcm, dtype="<i2").tolist()) == {2000}
    assert audio.clock == pytest.approx(0.1)


def test_received_before_maps_wall_time_to_the_session_clock() -> None:
    import time

    audio = SessionAudio("linear16", 16000)
    before = time.monotonic()
    audio.feed(bytes(3200))  # 0.1 s
    middle = time.monotonic()
    time.sleep(0.01)
    audio.feed(bytes(3200))
    assert audio.received_before(before - 1) == 0.0
    assert audio.received_before(middle) == pytest.approx(0.1)
    assert audio.received_before(time.monotonic()) == pytest.approx(0.2)


@pytest.mark.parametrize("encoding", ["linear16", None])
async def test_clock_rate_linear16_comes_out_as_the_bytes_sent(encoding: str | None) -> None:
    # Whole-sample 16 kHz mono frames (declared, or sniffed as raw) are placed as they are:
    # the same bytes, contiguous on the clock, counted and hashed as received.
    pcm = np.random.default_rng(2).integers(-32768, 32768, 16000, dtype=np.int64).astype("<i2")
    data = pcm.tobytes()
    audio = SessionAudio(encoding, 16000)
    out = b""
    for i in range(0, len(data), 640):  # 20 ms frames
        for block in await audio.decode(data[i:i + 640]):
            assert block.start * 2 == len(out)
            out += block.pcm
    for block in await audio.finish():
        out += block.pcm
    assert out == data
    assert audio.next_sample == 16000 and audio.received_bytes == len(data)
    assert audio.sha256 == hashlib.sha256(data).hexdigest()
