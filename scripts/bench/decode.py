#!/usr/bin/env python3
"""Where a webm/opus session's decode CPU goes, one layer at a time, in ms of CPU per second
of audio (process CPU time, one session at a time, no daemon):

- `demux_decode`: FFmpeg's Matroska demuxer and Opus decoder through PyAV, nothing else;
- `plus_frames_pcm`: and the decoded frames joined and converted once per 250 ms piece;
- `stream_decoder`: `StreamDecoder.feed()` per piece (its thread, pipe and hand-off);
- `session_audio`: `SessionAudio.decode()` per piece (adds resampling to 16 kHz);
- `linear16`: `SessionAudio.decode()` on the same audio as 16 kHz linear16 in 100 ms frames.

    python scripts/bench/decode.py --seconds 20 --rounds 7

`--paced 1,8,32` instead runs N sessions at once on one event loop, each fed in real time
(a 250 ms webm/opus piece every 250 ms, or a 100 ms linear16 frame every 100 ms), the two
formats alternating, and splits the process's CPU into the loop thread's and the decoder
threads' (getrusage), with context switches per hand-off. Back to back (above), the decoder's
code and data stay in cache; paced, every hand-off starts cold and wakes two sleeping threads,
as in the daemon.

    python scripts/bench/decode.py --paced 1,8,32 --seconds 10 --rounds 3

Two floors run with it, so that the decoder's own share can be told from its hand-off's:
`pacing` (the loop only wakes and sleeps on the same schedule: the harness itself) and
`opus_codec` (the same Opus packets, demuxed beforehand, decoded inline on the loop by a
PyAV `CodecContext` and joined with `frames_pcm`: no demuxer, no thread, no resampling,
which is what any design that decodes with FFmpeg pays at least). And two without resampling,
to price the decoder thread: `stream_decoder` (`StreamDecoder.feed()` per piece, as the daemon
decodes) against `webm_inline` (the same demuxer and decoder run on the loop thread itself,
suspended in a greenlet when out of bytes; not usable in the daemon, where a stalled FFmpeg
would then hold the loop; skipped without the `greenlet` package, which Playwright brings).

The audio is the server benchmark's (tone-coded words, libopus 32 kb/s, 250 ms pieces).
Medians over rounds, the variants alternating within each round.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import io
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import av
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script, too
from edge.audio import SessionAudio
from edge.client import timed_pieces
from edge.decode import OPEN_OPTIONS, READ_BUFFER_BYTES, StreamDecoder, frames_pcm, run_key
from edge.decode_process import DecoderProcess
from scripts.bench.harness import emit
from scripts.bench.server import tone_signal


def variants(webm: bytes, pieces: list[bytes], frames: list[bytes]) -> dict[str, Callable[[], None]]:
    def decode(take: Callable[[av.AudioFrame], None]) -> None:
        with av.open(io.BytesIO(webm), format="matroska") as container:
            stream = container.streams.audio[0]
            ctx = stream.codec_context
            for packet in container.demux(stream):
                for frame in ctx.decode(packet):
                    take(frame)

    def converted() -> None:
        batch: list[av.AudioFrame] = []

        def take(frame: av.AudioFrame) -> None:
            batch.append(frame)
            if len(batch) == 12:  # ~250 ms of 20 ms packets: one hand-off's worth
                frames_pcm(batch, run_key(batch[0]))
                batch.clear()

        decode(take)

    async def streamed() -> None:
        decoder = StreamDecoder("matroska")
        for piece in pieces:
            await decoder.feed(piece)
        await decoder.finish()
        decoder.close()

    async def session(chunks: list[bytes]) -> None:
        audio = SessionAudio(None, 16000)
        for chunk in chunks:
            await audio.decode(chunk)
        await audio.finish()
        audio.close()

    return {
        "demux_decode": lambda: decode(lambda _frame: None),
        "plus_frames_pcm": converted,
        "stream_decoder": lambda: asyncio.run(streamed()),
        "session_audio": lambda: asyncio.run(session(pieces)),
        "linear16": lambda: asyncio.run(session(frames)),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    pcm, webm, _words = tone_signal(args.seconds)
    audio_s = len(pcm) / 16000
    pieces = [piece for piece, _ in timed_pieces(webm, 0.25)]
    frames = [pcm[i:i + 1600].tobytes() for i in range(0, len(pcm), 1600)]
    cases = variants(webm, pieces, frames)
    times: dict[str, list[float]] = {name: [] for name in cases}
    load = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        for name, fn in cases.items():
            started = time.process_time()
            fn()
            times[name].append((time.process_time() - started) / audio_s * 1000)
        load.append(os.getloadavg()[0])
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "load_avg_1m": [round(x, 2) for x in load]},
        "audio_s": round(audio_s, 1),
        "cpu_ms_per_audio_s": {name: {"median": round(statistics.median(v), 3),
                                      "min": round(min(v), 3)} for name, v in times.items()},
    }


class _Pacing:
    """The `pacing` floor: a session that does nothing with its pieces."""

    async def decode(self, _chunk: Any) -> None:
        return None

    def close(self) -> None:
        return None


class _OpusCodec:
    """The `opus_codec` floor: one piece's Opus packets decoded inline by FFmpeg's decoder."""

    def __init__(self, extradata: bytes) -> None:
        self._ctx: Any = av.CodecContext.create("opus", "r")
        self._ctx.extradata = extradata
        self._ctx.sample_rate, self._ctx.layout = 48000, "mono"

    async def decode(self, packets: list[bytes]) -> None:
        frames = [f for p in packets for f in self._ctx.decode(av.Packet(p))]
        if frames:
            frames_pcm(frames, run_key(frames[0]))

    def close(self) -> None:
        return None


class _Decoder:
    """`stream_decoder`: `StreamDecoder.feed()` alone, as `SessionAudio` calls it."""

    def __init__(self) -> None:
        self._decoder = StreamDecoder("matroska")

    async def decode(self, piece: bytes) -> None:
        await self._decoder.feed(piece)

    def close(self) -> None:
        self._decoder.close()


class _Inline:
    """`webm_inline`: PyAV's demuxer and decoder on the calling thread, in a greenlet that
    switches back to its caller whenever the demuxer asks for bytes that have not come yet."""

    def __init__(self) -> None:
        import greenlet

        self._greenlet = greenlet
        self._buf = bytearray()
        self._frames: list[av.AudioFrame] = []
        self._caller: Any = None
        self._demuxer = greenlet.greenlet(self._run)

    def read(self, n: int) -> bytes:  # what FFmpeg reads from, inside the greenlet
        while not self._buf:
            self._caller.switch()
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def _run(self) -> None:
        with av.open(self, mode="r", format="matroska", buffer_size=READ_BUFFER_BYTES,
                     options=dict(OPEN_OPTIONS)) as container:
            for frame in container.decode(container.streams.audio[0]):
                self._frames.append(frame)

    async def decode(self, piece: bytes) -> None:
        self._buf += piece
        self._caller = self._greenlet.getcurrent()
        self._demuxer.switch()
        frames, self._frames = self._frames, []
        if frames:
            frames_pcm(frames, run_key(frames[0]))

    def close(self) -> None:
        return None


def opus_pieces(webm: bytes, period: float) -> tuple[list[list[bytes]], bytes]:
    """The WebM's Opus packets grouped into `period`-long pieces by timestamp, and the
    stream's extradata (OpusHead)."""
    pieces: list[list[bytes]] = []
    with av.open(io.BytesIO(webm), format="matroska") as container:
        stream = container.streams.audio[0]
        extradata = bytes(stream.codec_context.extradata or b"")
        for packet in container.demux(stream):
            if packet.size == 0 or packet.pts is None:
                continue
            k = int(float(packet.pts * stream.time_base) / period)
            while len(pieces) <= k:
                pieces.append([])
            pieces[k].append(bytes(packet))
    return pieces, extradata


async def paced_step(chunks: list[Any], period: float, streams: int,
                     make: Callable[[], Any] = lambda: SessionAudio(None, 16000),
                     remote: bool = False) -> dict[str, float]:
    """`streams` sessions (made by `make`: a `SessionAudio` unless a floor is measured) fed
    `chunks` in real time on this loop: CPU in ms per second of audio per stream (process,
    loop thread, the rest = decoder threads; `child`: the decoder process's, which `total`
    includes) and context switches per chunk (voluntary + involuntary, this process).
    `remote`: `make` takes a `DecoderProcess`, started before measuring."""
    decoders = DecoderProcess() if remote else None
    child = psutil.Process(await decoders.start()) if decoders is not None else None
    audios = [make(decoders) if remote else make() for _ in range(streams)]

    async def stream(audio: Any, offset: float) -> None:
        await asyncio.sleep(offset)  # spread the sessions over one period, as clients are
        t0 = time.monotonic()
        for i, chunk in enumerate(chunks):
            await audio.decode(chunk)
            await asyncio.sleep(max(0.0, t0 + (i + 1) * period - time.monotonic()))

    child0 = _cpu_s(child)
    before = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_THREAD)
    await asyncio.gather(*(stream(a, period * k / streams) for k, a in enumerate(audios)))
    after = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_THREAD)
    child_s = _cpu_s(child) - child0
    for audio in audios:  # after measuring: the decoder threads end here
        audio.close()
    if decoders is not None:
        await decoders.close()
    cpu = [a.ru_utime + a.ru_stime - b.ru_utime - b.ru_stime
           for a, b in zip(after, before, strict=True)]
    switches = (after[0].ru_nvcsw + after[0].ru_nivcsw) - (before[0].ru_nvcsw + before[0].ru_nivcsw)
    per = 1000 / (streams * len(chunks) * period)
    return {"total": (cpu[0] + child_s) * per, "loop": cpu[1] * per,
            "threads": (cpu[0] - cpu[1]) * per, "child": child_s * per,
            "switches_per_chunk": switches / (streams * len(chunks))}


def _cpu_s(proc: psutil.Process | None) -> float:
    if proc is None:
        return 0.0
    t = proc.cpu_times()
    return t.user + t.system


def run_paced(args: argparse.Namespace) -> dict[str, Any]:
    pcm, webm, _words = tone_signal(args.seconds)
    packets, extradata = opus_pieces(webm, 0.25)
    webm_pieces = [piece for piece, _ in timed_pieces(webm, 0.25)]
    session = lambda: SessionAudio(None, 16000)  # noqa: E731
    feeds: dict[str, tuple[list[Any], float, Callable[[], Any]]] = {
        "linear16": ([pcm[i:i + 1600].tobytes() for i in range(0, len(pcm), 1600)], 0.1, session),
        "webm_opus": (webm_pieces, 0.25, session),
        "decoder_process": (webm_pieces, 0.25,
                            lambda d: SessionAudio(None, 16000, decoders=d.decoder)),
        "pacing": (packets, 0.25, _Pacing),
        "opus_codec": (packets, 0.25, lambda: _OpusCodec(extradata)),
        "stream_decoder": (webm_pieces, 0.25, _Decoder),
    }
    if importlib.util.find_spec("greenlet") is not None:
        feeds["webm_inline"] = (webm_pieces, 0.25, _Inline)
    if args.only:
        feeds = {k: v for k, v in feeds.items() if k in [*args.only.split(","), "linear16", "webm_opus"]}
    counts = [int(n) for n in args.paced.split(",")]
    got: dict[tuple[int, str], list[dict[str, float]]] = {(n, f): [] for n in counts for f in feeds}
    load = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        for n in counts:
            for name, (chunks, period, make) in feeds.items():
                got[n, name].append(asyncio.run(paced_step(chunks, period, n, make,
                                                           remote=name == "decoder_process")))
        load.append(os.getloadavg()[0])
    steps = []
    for n in counts:
        step: dict[str, Any] = {"streams": n}
        for name in feeds:
            step[name] = {k: round(statistics.median(r[k] for r in got[n, name]), 3)
                          for k in got[n, name][0]}
        step["ratio_total"] = round(step["webm_opus"]["total"] / step["linear16"]["total"], 2)
        # What FFmpeg's Opus decoder alone costs at this many sessions, the harness taken out.
        if "opus_codec" in step and "pacing" in step:
            step["opus_codec_floor"] = round(step["opus_codec"]["total"] - step["pacing"]["total"], 3)
        if "decoder_process" in step:
            step["ratio_decoder_process"] = round(
                step["decoder_process"]["total"] / step["linear16"]["total"], 2)
        if "webm_inline" in step and "stream_decoder" in step:  # what the decoder thread and its hand-off add
            step["thread_cost"] = round(step["stream_decoder"]["total"] - step["webm_inline"]["total"], 3)
        steps.append(step)
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "load_avg_1m": [round(x, 2) for x in load]},
        "audio_s": round(len(pcm) / 16000, 1),
        "unit": "ms of CPU per second of audio per stream (medians over rounds)",
        "paced": steps,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20.0, help="audio per round")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--paced", help="stream counts, e.g. 1,8,32: real-time sessions at once")
    ap.add_argument("--only", help="--paced: these variants (with linear16 and webm_opus), "
                    "e.g. decoder_process")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    emit(run_paced(args) if args.paced else run(args), args.out)


if __name__ == "__main__":
    main()
