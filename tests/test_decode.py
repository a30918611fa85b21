"""formats.py and decode.py without a server: the sniffer's and WAV parser's decisions, and
the streaming decoder's hand-off."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from pathlib import Path

import av
import numpy as np
import pytest

from edge.decode import HANDOFF_WAIT_S, StreamDecoder, frames_pcm, run_key
from edge.formats import (
    NEED_MORE,
    SNIFF_BYTES,
    DecodeError,
    WavDecoder,
    WavFormat,
    parse_wav_header,
    sniff,
)

needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs Debian's ffmpeg")


def make(tmp_path: Path, name: str, *options: str, seconds: float = 1.0) -> bytes:
    out = tmp_path / name
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                    f"sine=frequency=440:sample_rate=48000:duration={seconds}", *options,
                    str(out)], check=True)
    return out.read_bytes()


@needs_ffmpeg
@pytest.mark.parametrize(("name", "options", "fmt"), [
    ("a.webm", ["-c:a", "libopus"], "matroska"),
    ("a.ogg", ["-c:a", "libopus"], "ogg"),
    ("a.wav", [], "wav"),
    ("a.flac", [], "flac"),
    ("a.mp3", [], "mp3"),
    ("b.mp3", ["-id3v2_version", "0", "-write_xing", "0"], "mp3"),
    ("a.aac", ["-f", "adts"], "aac"),
    ("a.m4a", ["-movflags", "+faststart"], "mov"),
])
def test_sniff_names_the_container(tmp_path: Path, name: str, options: list[str], fmt: str
                                   ) -> None:
    data = make(tmp_path, name, *options)
    assert sniff(data[:SNIFF_BYTES]) == fmt
    assert sniff(data[:11]) == NEED_MORE


def test_raw_pcm_is_no_container_even_with_a_frame_sync_in_front() -> None:
    rng = np.random.default_rng(0)
    pcm = rng.integers(-3000, 3000, 4000).astype("<i2")
    assert sniff(pcm.tobytes()) is None
    pcm[:2] = (-1025, 144)  # FF FB 90 00: a valid MPEG-1 layer III header (417-byte frame)
    assert sniff(pcm.tobytes()[:100]) == NEED_MORE  # cannot tell yet: no second header
    assert sniff(pcm.tobytes()) is None  # no second frame where the first one ends


@needs_ffmpeg
async def test_each_chunk_returns_the_audio_it_completed(tmp_path: Path) -> None:
    """The hand-off waits for the thread to use the chunk: a chunk holding whole packets
    gives their samples back at once, not one chunk later."""
    data = make(tmp_path, "a.webm", "-c:a", "libopus", "-b:a", "32k", seconds=4.0)
    decoder = StreamDecoder("matroska")
    half = len(data) // 2
    got = [sum(p.samples.shape[0] for p in await decoder.feed(data[:half]))]
    got.append(sum(p.samples.shape[0] for p in await decoder.feed(data[half:])))
    got.append(sum(p.samples.shape[0] for p in await decoder.finish()))
    assert sum(got) == 4 * 48000
    assert got[0] >= 0.8 * 2 * 48000  # the first half's audio, not nothing
    assert decoder.codec == "opus"


@needs_ffmpeg
async def test_a_stall_raises_and_the_thread_stops(tmp_path: Path) -> None:
    data = make(tmp_path, "a.webm", "-c:a", "libopus", seconds=30.0)
    decoder = StreamDecoder("matroska", feed_timeout_s=0.001)
    with pytest.raises(DecodeError, match="decoder stalled"):
        await decoder.feed(data)
    assert decoder._thread is not None
    for _ in range(100):  # told to stop at its next read
        if not decoder._thread.is_alive():
            break
        await asyncio.sleep(0.05)
    assert not decoder._thread.is_alive()
    with pytest.raises(DecodeError, match="decoder stalled"):  # the session stays failed
        await decoder.feed(b"more")


@needs_ffmpeg
async def test_closing_mid_stream_ends_the_thread_quietly(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """A session's end closes its decoder while FFmpeg waits for bytes: the thread ends,
    with no error and nothing on stderr (an exception raised in PyAV's read callback was
    printed as "exception being dropped", a traceback per finished session)."""
    data = make(tmp_path, "a.webm", "-c:a", "libopus", "-b:a", "32k", seconds=2.0)
    decoder = StreamDecoder("matroska")
    assert await decoder.feed(data[:len(data) // 2])
    decoder.close()
    assert decoder._thread is not None
    decoder._thread.join(timeout=5)
    assert not decoder._thread.is_alive()
    assert decoder._error is None
    assert capfd.readouterr().err == ""


@needs_ffmpeg
async def test_a_slow_chunk_is_awaited_without_holding_the_loop(tmp_path: Path) -> None:
    """A chunk whose decode outlasts HANDOFF_WAIT_S (here 60 s of Opus at once, tens of ms)
    is finished asynchronously: the loop keeps running meanwhile, and no audio is lost."""
    data = make(tmp_path, "a.webm", "-c:a", "libopus", "-b:a", "32k", seconds=60.0)
    decoder = StreamDecoder("matroska")
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0)
            ticks += 1

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    started = time.monotonic()
    got = sum(p.samples.shape[0] for p in await decoder.feed(data))
    took = time.monotonic() - started
    tick.cancel()
    got += sum(p.samples.shape[0] for p in await decoder.finish())
    assert got == 60 * 48000
    assert took > 2 * HANDOFF_WAIT_S  # else this test proves nothing: make the chunk longer
    assert ticks >= 3, f"the loop ran {ticks} times during a {took:.3f} s decode"


FRAME_CASES = [  # (FFmpeg sample format, channels, numpy dtype of from_ndarray, full scale)
    ("s16", 1, np.int16, 32768), ("s16", 2, np.int16, 32768), ("s16p", 2, np.int16, 32768),
    ("s32", 1, np.int32, 2**31), ("flt", 1, np.float32, 1), ("fltp", 2, np.float32, 1),
    ("dbl", 1, np.float64, 1), ("u8", 1, np.uint8, 128),
]


@pytest.mark.parametrize(("fmt", "channels", "dtype", "scale"), FRAME_CASES)
def test_frames_become_one_pcm_as_pyav_reads_them(fmt: str, channels: int, dtype: type,
                                                   scale: float) -> None:
    """Joined frames in every sample format give what PyAV's own `to_ndarray()` reads from
    each frame, scaled to [-1, 1] and laid out (samples, channels)."""
    rng = np.random.default_rng(len(fmt) + channels)
    frames, want = [], []
    for n in (7, 960, 1):  # uneven frame sizes, as codecs give at the start and the end
        if np.issubdtype(dtype, np.floating):
            values = rng.uniform(-1, 1, (channels, n)).astype(dtype)
        else:
            info = np.iinfo(dtype)
            values = rng.integers(info.min, info.max, (channels, n), dtype=dtype,
                                  endpoint=True)
        packed = not fmt.endswith("p")
        frame = av.AudioFrame.from_ndarray(values.T.reshape(1, -1) if packed else values,
                                           format=fmt, layout="mono" if channels == 1 else "stereo")
        frame.sample_rate = 24000
        frames.append(frame)
        read = frame.to_ndarray().astype(np.float64)
        read = read.reshape(n, channels) if packed else read.T
        want.append((read - (128 if fmt == "u8" else 0)) / scale)
    key = run_key(frames[0])
    assert key == (fmt, channels, 24000)
    pcm = frames_pcm(frames, key)
    assert pcm.rate == 24000 and pcm.samples.dtype == np.float32
    assert pcm.samples.shape == (968, channels)
    np.testing.assert_allclose(pcm.samples, np.concatenate(want), rtol=1e-6, atol=1e-7)


def test_a_padded_plane_gives_only_its_samples() -> None:
    frame = av.AudioFrame(format="s16", layout="mono", samples=5, align=32)
    frame.sample_rate = 8000
    assert frame.planes[0].buffer_size > 10  # FFmpeg's alignment: padding after 5 samples
    frame.planes[0].update(np.arange(1, 17, dtype="<i2").tobytes())
    pcm = frames_pcm([frame, frame], run_key(frame))
    assert list(np.rint(pcm.samples[:, 0] * 32768)) == [1, 2, 3, 4, 5] * 2


def test_an_unconvertible_sample_format_is_a_decode_error() -> None:
    frame = av.AudioFrame(format="s64", layout="mono", samples=4)
    frame.sample_rate = 8000
    with pytest.raises(DecodeError, match="unsupported sample format s64"):
        run_key(frame)


def wav_header(tag: int, channels: int, rate: int, bits: int, *, riff: bytes = b"RIFF",
               extra: bytes = b"", extensible: bool = False) -> bytes:
    align = channels * bits // 8
    fmt = (tag if not extensible else 0xFFFE).to_bytes(2, "little") + \
        channels.to_bytes(2, "little") + rate.to_bytes(4, "little") + \
        (rate * align).to_bytes(4, "little") + align.to_bytes(2, "little") + \
        bits.to_bytes(2, "little")
    if extensible:  # cbSize, valid bits, channel mask, sub-format GUID (tag first)
        fmt += (22).to_bytes(2, "little") + bits.to_bytes(2, "little") + bytes(4) + \
            tag.to_bytes(2, "little") + bytes(14)
    chunks = extra + b"fmt " + len(fmt).to_bytes(4, "little") + fmt
    return riff + b"\xff\xff\xff\xff" + b"WAVE" + chunks + b"data" + b"\xff\xff\xff\xff"


@pytest.mark.parametrize(("header", "want"), [
    (wav_header(1, 1, 48000, 16), WavFormat("pcm", 16, 1, 48000, 44)),
    (wav_header(3, 2, 44100, 32, riff=b"RF64", extra=b"ds64" + (28).to_bytes(4, "little")
                + bytes(28)), WavFormat("float", 32, 2, 44100, 80)),
    (wav_header(7, 1, 8000, 8, extensible=True), WavFormat("mulaw", 8, 1, 8000, 68)),
    (wav_header(6, 1, 8000, 8, extra=b"LIST" + (5).to_bytes(4, "little") + b"INFOx\x00"),
     WavFormat("alaw", 8, 1, 8000, 58)),
    (wav_header(1, 1, 48000, 24), None),  # 24-bit: left to FFmpeg
    (wav_header(2, 1, 8000, 4), None),  # MS ADPCM: left to FFmpeg
])
def test_wav_header_parses_or_asks_for_more_bytes(header: bytes, want: WavFormat | None) -> None:
    assert parse_wav_header(header) == want
    assert parse_wav_header(header[:30]) == NEED_MORE


def test_wav_header_errors_name_the_problem() -> None:
    with pytest.raises(DecodeError, match="0 channels at 16000 Hz"):
        parse_wav_header(wav_header(1, 0, 16000, 16))
    with pytest.raises(DecodeError, match="data chunk comes before its fmt"):
        parse_wav_header(b"RIFF\x00\x00\x00\x00WAVEdata\x00\x00\x00\x00")


async def test_wav_samples_split_anywhere_are_carried() -> None:
    fmt = WavFormat("pcm", 16, 2, 48000, 44)
    stereo = np.arange(-3000, 3000, dtype="<i2").reshape(-1, 2)
    data = stereo.tobytes()
    decoder = WavDecoder(fmt)
    parts = []
    for i in range(0, len(data), 7):  # 7 bytes: splits samples and sample frames
        parts += await decoder.feed(data[i:i + 7])
    got = np.concatenate([p.samples for p in parts])
    assert got.shape == (3000, 2)
    assert np.array_equal(np.rint(got * 32768).astype(np.int16), stereo)


@pytest.mark.parametrize(("encoding", "rate", "frame"), [
    ("amr-nb", 8000, bytes([0x04]) + bytes(12)),  # storage format: ToC (MR475) + 12 bytes
    ("amr-wb", 16000, bytes([0x04]) + bytes(17)),  # ToC (6.60 kb/s) + 17 bytes
    ("g729", 8000, bytes(10)),  # one 10 ms G.729 frame
])
async def test_raw_codecs_without_an_encoder_here_are_framed_right(
    encoding: str, rate: int, frame: bytes
) -> None:
    """Framing only: Debian's ffmpeg has no AMR or G.729 encoder to make speech with, so
    one second of all-zero frames must come out as one second on the clock."""
    from edge.audio import SessionAudio

    frames_per_s = 100 if encoding == "g729" else 50
    data = frame * frames_per_s
    audio = SessionAudio(encoding, rate)
    samples = 0
    for i in range(0, len(data), 37):  # frames split anywhere
        samples += sum(b.samples for b in await audio.decode(data[i:i + 37]))
    samples += sum(b.samples for b in await audio.finish())
    assert abs(samples - 16000) <= 160
