"""Containerized and compressed audio through the daemon to the fake Google service.

Every file is made by Debian's ffmpeg from one tone-coded signal (tests/fakes/google_speech.py:
word id = tone frequency, which lossy codecs keep), streamed to `/v1/listen` in pieces of
random size, and the words must come back with their times within 0.1 s. Bad input gets
Error DATA-0000 and close 1008, and leaves a neighbour session and the loop alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal as signal_
import subprocess
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import av
import numpy as np
import psutil
import pytest
import soundfile as sf
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from edge.app import App
from tests.fakes.google_speech import ScriptWord, tone_encode
from tests.helpers.daemon import AUTH, final_words, with_fake_google

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs Debian's ffmpeg")

SOURCE_RATE = 48000
SEGMENTS = [(0, 0.3), (3, 0.5), (6, 0.4), (0, 0.6), (2, 0.5), (8, 0.4), (0, 0.7)]

# name -> ffmpeg output options. Rates and channels differ on purpose: the header decides.
FORMATS: dict[str, list[str]] = {
    "webm-opus": ["-c:a", "libopus", "-b:a", "32k", "-f", "webm"],
    "webm-vorbis": ["-ac", "2", "-c:a", "vorbis", "-strict", "-2", "-f", "webm"],
    "ogg-opus": ["-c:a", "libopus", "-b:a", "24k", "-f", "ogg"],
    "ogg-vorbis": ["-ac", "2", "-c:a", "vorbis", "-strict", "-2", "-f", "ogg"],
    "ogg-flac": ["-c:a", "flac", "-f", "ogg"],
    "flac": ["-ar", "44100", "-c:a", "flac", "-f", "flac"],
    "wav-s16-48k": ["-c:a", "pcm_s16le", "-f", "wav"],
    "wav-f32-stereo-44k": ["-ar", "44100", "-ac", "2", "-c:a", "pcm_f32le", "-f", "wav"],
    "wav-mulaw-8k": ["-ar", "8000", "-c:a", "pcm_mulaw", "-f", "wav"],
    "wav-alaw-8k": ["-ar", "8000", "-c:a", "pcm_alaw", "-f", "wav"],
    "wav-s24-ffmpeg": ["-c:a", "pcm_s24le", "-f", "wav"],  # not numpy's: FFmpeg decodes it
    "rf64-s16-24k": ["-ar", "24000", "-c:a", "pcm_s16le", "-rf64", "always", "-f", "wav"],
    "mp3-id3": ["-c:a", "libmp3lame", "-b:a", "64k", "-f", "mp3"],
    "mp3-bare": ["-ar", "44100", "-c:a", "libmp3lame", "-b:a", "96k", "-id3v2_version", "0",
                 "-write_xing", "0", "-f", "mp3"],
    "aac-adts": ["-c:a", "aac", "-b:a", "64k", "-f", "adts"],
    "mp4-aac": ["-c:a", "aac", "-b:a", "64k", "-movflags", "+faststart", "-f", "mp4"],
}


@pytest.fixture(scope="module")
def signal(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, list[ScriptWord]]:
    audio, script = tone_encode(SEGMENTS, SOURCE_RATE)
    path = tmp_path_factory.mktemp("codecs") / "source.wav"
    sf.write(str(path), audio, SOURCE_RATE, subtype="FLOAT")
    return path, audio, script


def ffmpeg(source: Path, options: list[str], out: Path, *inputs: str) -> bytes:
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", *inputs,
                    "-i", str(source), *options, str(out)], check=True)
    return out.read_bytes()


def pieces(data: bytes, seed: int, largest: int = 4000) -> Iterable[bytes]:
    rng = random.Random(seed)
    i = 0
    while i < len(data):
        n = rng.randint(1, largest)
        yield data[i:i + n]
        i += n


async def stream(app: App, chunks: Iterable[bytes], query: str = "",
                 close: bool = True) -> tuple[list[dict[str, Any]], int | None, str]:
    """Send `chunks` as binary frames, then CloseStream; every message until the close."""
    url = f"ws://127.0.0.1:{app.server.port}/v1/listen" + (f"?{query}" if query else "")
    messages: list[dict[str, Any]] = []
    async with connect(url, additional_headers=AUTH, max_size=None) as ws:
        try:
            for chunk in chunks:
                await ws.send(chunk)
            if close:
                await ws.send(json.dumps({"type": "CloseStream"}))
            while True:
                messages.append(json.loads(await asyncio.wait_for(ws.recv(), 20)))
        except ConnectionClosed:
            pass
        return messages, ws.close_code, ws.close_reason


def assert_words(messages: list[dict[str, Any]], script: list[ScriptWord], tol: float = 0.1
                 ) -> None:
    words = final_words(messages)
    assert [w["word"] for w in words] == [s.text for s in script], messages
    for w, s in zip(words, script, strict=True):
        assert w["start"] == pytest.approx(s.start / 16000, abs=tol), (w, s)
        assert w["end"] == pytest.approx(s.end / 16000, abs=tol), (w, s)


@pytest.fixture
async def daemon() -> AsyncIterator[App]:
    # The clients here send files in random pieces as fast as they can: far above the
    # frame-rate bound (EDGE_MAX_FRAMES_PER_S) that stops floods of tiny frames.
    async with with_fake_google(word_code="tone", edge_stt_language="en-US",
                                edge_max_frames_per_s=100_000) as app:
        yield app


@pytest.mark.parametrize("name", sorted(FORMATS))
async def test_container_without_encoding_is_sniffed_and_decoded(
    daemon: App, signal: tuple[Path, np.ndarray, list[ScriptWord]], tmp_path: Path, name: str
) -> None:
    source, _, script = signal
    data = ffmpeg(source, FORMATS[name], tmp_path / name)
    messages, code, _ = await stream(daemon, pieces(data, seed=len(name)))
    assert code == 1000, messages
    assert_words(messages, script)
    meta = messages[-1]
    assert meta["type"] == "Metadata"
    assert meta["duration"] == pytest.approx(sum(s for _, s in SEGMENTS), abs=0.1)


async def test_encoding_ogg_opus_and_flac_follow_deepgram(
    daemon: App, signal: tuple[Path, np.ndarray, list[ScriptWord]], tmp_path: Path
) -> None:
    source, _, script = signal
    for encoding, options in (("ogg-opus", FORMATS["ogg-opus"]), ("flac", FORMATS["flac"]),
                              ("opus", FORMATS["webm-opus"])):
        data = ffmpeg(source, options, tmp_path / encoding)
        messages, code, _ = await stream(daemon, pieces(data, seed=7), f"encoding={encoding}")
        assert code == 1000, (encoding, messages)
        assert_words(messages, script)


@pytest.mark.parametrize(("encoding", "rate", "codec"), [
    ("opus", 48000, ["-c:a", "libopus", "-b:a", "24k"]),
    ("speex", 16000, ["-ar", "16000", "-c:a", "libspeex"]),
])
async def test_raw_opus_and_speex_take_one_packet_per_frame(
    daemon: App, signal: tuple[Path, np.ndarray, list[ScriptWord]], tmp_path: Path,
    encoding: str, rate: int, codec: list[str],
) -> None:
    """`encoding=opus|speex` without a container: every frame is one packet (RTP-style)."""
    source, _, script = signal
    ogg = tmp_path / "raw.ogg"
    ffmpeg(source, [*codec, "-f", "ogg"], ogg)
    with av.open(str(ogg)) as container:
        packets = [bytes(p) for p in container.demux(audio=0) if p.size]
    messages, code, _ = await stream(daemon, packets, f"encoding={encoding}&sample_rate={rate}")
    assert code == 1000, messages
    assert_words(messages, script)


async def test_linear32_is_float32_at_sample_rate(
    daemon: App, signal: tuple[Path, np.ndarray, list[ScriptWord]]
) -> None:
    _, audio, script = signal
    data = audio.astype("<f4").tobytes()
    messages, code, _ = await stream(daemon, pieces(data, seed=3),
                                     f"encoding=linear32&sample_rate={SOURCE_RATE}")
    assert code == 1000
    assert_words(messages, script, tol=0.02)


async def test_no_container_is_linear16_at_sample_rate(
    daemon: App, signal: tuple[Path, np.ndarray, list[ScriptWord]]
) -> None:
    """Room devices send raw linear16 without `encoding`; this one starts with an MP3-like
    MPEG layer III header (samples -1025, 144: FF FB 90 00), which must not fool the sniffer."""
    _, audio, script = signal
    pcm = np.clip(np.rint(audio * 32768), -32768, 32767).astype("<i2")
    pcm[:2] = (-1025, 144)
    messages, code, _ = await stream(daemon, pieces(pcm.tobytes(), seed=5),
                                     f"sample_rate={SOURCE_RATE}")
    assert code == 1000
    assert_words(messages, script, tol=0.02)


# --- bad and tricky input -------------------------------------------------------------------


def webm_header(data: bytes) -> bytes:
    """The bytes before the first Cluster element: EBML header, tracks, no audio."""
    return data[:data.index(b"\x1f\x43\xb6\x75")]


async def assert_data_error(app: App, chunks: Iterable[bytes], words: str,
                            close: bool = True) -> None:
    messages, code, reason = await stream(app, chunks, close=close)
    assert (code, reason) == (1008, "DATA-0000"), messages
    errors = [m for m in messages if m["type"] == "Error"]
    assert errors and errors[-1]["variant"] == "DATA-0000", messages
    assert words in errors[-1]["description"], errors[-1]
    assert not final_words(messages)  # nothing was made up from bad bytes


async def test_bad_input_gets_data_0000_and_neighbours_are_unharmed(
    daemon: App, signal: tuple[Path, np.ndarray, list[ScriptWord]], tmp_path: Path
) -> None:
    source, _, script = signal
    webm = ffmpeg(source, FORMATS["webm-opus"], tmp_path / "good.webm")
    ogg = ffmpeg(source, FORMATS["ogg-opus"], tmp_path / "good.ogg")
    wav = ffmpeg(source, FORMATS["wav-s16-48k"], tmp_path / "good.wav")
    video = ffmpeg(Path("testsrc=size=64x64:rate=5:duration=1"),
                   ["-c:v", "ffv1", "-f", "matroska"], tmp_path / "video.mkv", "-f", "lavfi")
    # An audio track whose codec no FFmpeg knows: the CodecID renamed in place.
    unknown = webm.replace(b"A_OPUS", b"A_QQQQ", 1)
    noise = random.Random(1).randbytes((1 << 20) + 200_000)

    lags: list[float] = []

    async def ticker() -> None:
        while True:
            t = time.monotonic()
            await asyncio.sleep(0.01)
            lags.append(time.monotonic() - t - 0.01)

    tick = asyncio.create_task(ticker())
    neighbour = asyncio.create_task(stream(daemon, pieces(webm, seed=11, largest=500)))
    await asyncio.gather(
        assert_data_error(daemon, [webm[:150]], "ended before any audio"),  # truncated header
        assert_data_error(daemon, [wav[:30]], "the WAV stream ended inside its header"),
        assert_data_error(daemon, pieces(video, seed=2), "no audio track (tracks: video)"),
        assert_data_error(daemon, pieces(unknown, seed=3), "audio codec is not one FFmpeg can decode"),
        assert_data_error(daemon, [webm_header(webm), *pieces(noise, 4, 60_000)],
                          "no audio decoded from the last", close=False),
        # Ogg checks its pages: FFmpeg itself refuses the noise.
        assert_data_error(daemon, [ogg[:200], *pieces(noise, 5, 60_000)],
                          "cannot decode Ogg", close=False),
    )
    messages, code, _ = await neighbour
    tick.cancel()
    assert code == 1000
    assert_words(messages, script)
    # A decoder blocking the loop would show as seconds; a shared, loaded CI box as tenths.
    assert max(lags) < 0.5, f"the loop stalled for {max(lags):.3f} s"


async def test_a_stalled_decoder_is_cut_off_without_blocking_the_loop(
    signal: tuple[Path, np.ndarray, list[ScriptWord]], tmp_path: Path
) -> None:
    """A decoder that overruns EDGE_DECODE_TIMEOUT_S on one frame (here: 30 s of Opus in one
    frame against a 1 ms budget) ends its session with DATA-0000; a raw neighbour goes on."""
    source, audio, script = signal
    long = ffmpeg(source, ["-c:a", "libopus", "-b:a", "32k", "-f", "webm"],
                  tmp_path / "long.webm", "-stream_loop", "9")
    assert len(long) < 262144  # one frame under EDGE_MAX_FRAME_BYTES
    pcm = np.clip(np.rint(audio * 32768), -32768, 32767).astype("<i2").tobytes()
    async with with_fake_google(
        word_code="tone", edge_stt_language="en-US",
        edge_decode_timeout_s=0.001,
        edge_max_frames_per_s=100_000,  # the neighbour sends small pieces as fast as it can
    ) as app:
        neighbour = asyncio.create_task(
            stream(app, pieces(pcm, seed=9, largest=960), f"sample_rate={SOURCE_RATE}"))
        started = time.monotonic()
        await assert_data_error(app, [long], "decoder stalled", close=False)
        assert time.monotonic() - started < 5
        messages, code, _ = await neighbour
    assert code == 1000
    assert_words(messages, script, tol=0.02)


async def test_a_decoder_process_crash_ends_only_its_sessions(
    daemon: App, signal: tuple[Path, np.ndarray, list[ScriptWord]], tmp_path: Path
) -> None:
    """The decoder process dies mid-stream (SIGKILL, as a segfault in FFmpeg would): the
    WebM/Opus session in it gets DECODER_UNAVAILABLE and close 1011 (not its audio's fault),
    a linear16 neighbour keeps every word, and the next WebM/Opus session starts a new
    decoder process."""
    source, audio, script = signal
    webm = ffmpeg(source, FORMATS["webm-opus"], tmp_path / "a.webm")
    pcm = np.clip(np.rint(audio * 32768), -32768, 32767).astype("<i2").tobytes()
    assert daemon.decoders is not None
    neighbour = asyncio.create_task(
        stream(daemon, pieces(pcm, seed=9, largest=960), f"sample_rate={SOURCE_RATE}"))
    url = f"ws://127.0.0.1:{daemon.server.port}/v1/listen"
    messages: list[dict[str, Any]] = []
    async with connect(url, additional_headers=AUTH, max_size=None) as ws:
        await ws.send(webm[:len(webm) // 2])
        for _ in range(200):
            if daemon.decoders.pid is not None:
                break
            await asyncio.sleep(0.01)
        first = daemon.decoders.pid
        assert first is not None
        os.kill(first, signal_.SIGKILL)
        with contextlib.suppress(ConnectionClosed):
            await ws.send(webm[len(webm) // 2:])
        with contextlib.suppress(ConnectionClosed):
            while True:
                messages.append(json.loads(await asyncio.wait_for(ws.recv(), 20)))
    assert (ws.close_code, ws.close_reason) == (1011, "decoder unavailable"), messages
    errors = [m for m in messages if m["type"] == "Error"]
    assert errors and errors[-1]["variant"] == "DECODER_UNAVAILABLE", messages
    assert "decoder process exited (signal 9)" in errors[-1]["description"], messages
    got = [w["word"] for w in final_words(messages)]  # the finals owed before the crash, if any
    assert got == [s.text for s in script][:len(got)], messages
    messages, code, _ = await neighbour
    assert code == 1000
    assert_words(messages, script, tol=0.02)
    messages, code, _ = await stream(daemon, pieces(webm, seed=4))
    assert code == 1000, messages
    assert_words(messages, script)
    assert daemon.decoders.starts == 2 and daemon.decoders.pid != first
    assert daemon.metrics.decoder_exits.labels("crash")._value.get() == 1


async def test_decoder_thread_setting_decodes_in_the_daemon(
    signal: tuple[Path, np.ndarray, list[ScriptWord]], tmp_path: Path
) -> None:
    """EDGE_DECODER=thread: no decoder process; the words are the same."""
    source, _, script = signal
    webm = ffmpeg(source, FORMATS["webm-opus"], tmp_path / "a.webm")
    async with with_fake_google(word_code="tone", edge_stt_language="en-US",
                                edge_max_frames_per_s=100_000, edge_decoder="thread") as app:
        assert app.decoders is None
        messages, code, _ = await stream(app, pieces(webm, seed=2))
        children = [" ".join(p.cmdline()) for p in psutil.Process().children()]
    assert code == 1000, messages
    assert_words(messages, script)
    assert not [c for c in children if "edge.decode_process" in c], children
