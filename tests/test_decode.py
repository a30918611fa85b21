"""decode.py without a server: the sniffer's decisions and the streaming decoder's hand-off."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from edge.decode import NEED_MORE, SNIFF_BYTES, DecodeError, StreamDecoder, sniff

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
    data = make(tmp_path, "a.wav", "-c:a", "pcm_s16le", seconds=2.0)
    decoder = StreamDecoder("wav")
    got = [sum(p.samples.shape[0] for p in await decoder.feed(data[:48_044]))]
    got.append(sum(p.samples.shape[0] for p in await decoder.feed(data[48_044:])))
    got.append(sum(p.samples.shape[0] for p in await decoder.finish()))
    assert sum(got) == 96000
    assert got[0] >= 20000  # most of the first 24000 samples, not nothing
    assert decoder.codec == "pcm_s16le"


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
