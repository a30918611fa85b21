"""A small `/v1/listen` client: stream a file at real time (or as fast as accepted), collect
what comes back, and render it as text lines (`show`), JSON lines or RTTM.

Used by `edge stream`, the load benchmarks and the end-to-end tests: one client, one way to
pace audio and read results.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlencode

import numpy as np
from websockets.asyncio.client import connect

from edge.diarization.files import segment_lines
from edge.query import MAX_RATE, MIN_RATE

# Consecutive labelled words of one speaker less than this apart make one RTTM segment.
WORD_GAP_S = 0.5


def read_audio(path: Path) -> tuple[np.ndarray, int]:
    """A WAV/FLAC file as mono int16 samples and its sample rate (channels are averaged).
    Raises `ValueError` for a rate `/v1/listen` does not take, soundfile's errors otherwise."""
    import soundfile as sf

    data, rate = sf.read(str(path), dtype="int16", always_2d=True)
    if not MIN_RATE <= rate <= MAX_RATE:
        raise ValueError(f"{path}: sample rate {rate} Hz is outside {MIN_RATE}-{MAX_RATE} Hz")
    mono = data.mean(axis=1).round().astype(np.int16) if data.shape[1] > 1 else data[:, 0]
    return mono, rate


def frames(samples: np.ndarray, rate: int, frame_ms: int) -> Iterator[bytes]:
    step = max(1, rate * frame_ms // 1000)
    for i in range(0, len(samples), step):
        yield samples[i:i + step].astype("<i2").tobytes()


@dataclass
class StreamResult:
    messages: list[dict[str, Any]] = field(default_factory=list)
    close_code: int | None = None
    close_reason: str = ""
    # monotonic time each message arrived, and when each audio frame was sent
    received_at: list[float] = field(default_factory=list)
    sent_at: list[float] = field(default_factory=list)  # per frame, monotonic
    sent_until: list[float] = field(default_factory=list)  # per frame: audio seconds complete
    sent_audio_s: float = 0.0
    frame_s: float = 0.1

    def sent_time(self, t: float) -> float | None:
        """When the frame holding session time `t` was sent (None if never). Frames may
        hold different lengths of audio (a container's pieces)."""
        i = bisect.bisect_left(self.sent_until, t - 1e-9)
        return self.sent_at[i] if t >= 0 and i < len(self.sent_at) else None

    @property
    def finals(self) -> list[dict[str, Any]]:
        return [m for m in self.messages if m.get("type") == "Results" and m.get("is_final")]

    @property
    def metadata(self) -> dict[str, Any] | None:
        return next((m for m in self.messages if m.get("type") == "Metadata"), None)


async def stream_audio(
    url: str,
    samples: np.ndarray,
    rate: int,
    *,
    key: str | None = None,
    query: dict[str, Any] | None = None,
    fast: bool = False,
    speed: float = 1.0,
    frame_ms: int = 100,
    on_message: Callable[[dict[str, Any]], None] | None = None,
) -> StreamResult:
    """Send `samples` (mono int16 at `rate`) to `url` + `/v1/listen`, paced at `speed` times
    real time (or as fast as the daemon accepts with `fast`), then CloseStream; returns
    everything received. Raises websockets' InvalidStatus
    when the handshake is refused and OSError when the daemon is unreachable."""
    params = {"encoding": "linear16", "sample_rate": rate, **(query or {})}
    sent = ((f, len(f) / 2 / rate) for f in frames(samples, rate, frame_ms))
    return await _stream(url, params, sent, max(1, rate * frame_ms // 1000) / rate, key=key,
                         fast=fast, speed=speed, on_message=on_message)


def timed_pieces(data: bytes, frame_s: float) -> list[tuple[bytes, float]]:
    """A container stream (WebM, Ogg, MP3, ...) cut where each `frame_s` of audio is complete,
    as a browser's MediaRecorder hands it out: (bytes, seconds of audio they complete)."""
    import io

    import av

    cuts: list[tuple[int, float]] = []
    with av.open(io.BytesIO(data)) as container:
        for packet in container.demux(audio=0):
            if packet.pos is None or packet.pos < 0 or packet.pts is None:
                continue
            t = float(packet.pts * packet.time_base)
            if t >= (len(cuts) + 1) * frame_s:
                cuts.append((packet.pos, t))
    pieces, start, done = [], 0, 0.0
    for pos, t in cuts:
        if pos > start:
            pieces.append((data[start:pos], t - done))
            start, done = pos, t
    pieces.append((data[start:], frame_s))
    return pieces


async def stream_encoded(
    url: str,
    pieces: Iterable[tuple[bytes, float]],
    *,
    key: str | None = None,
    query: dict[str, Any] | None = None,
    speed: float = 1.0,
    on_message: Callable[[dict[str, Any]], None] | None = None,
) -> StreamResult:
    """Send a containerized/compressed stream without `encoding`, paced as its `pieces`
    (bytes, seconds of audio they complete: see `timed_pieces`) say, then CloseStream."""
    pieces = list(pieces)
    frame_s = max(s for _, s in pieces) if pieces else 0.25
    return await _stream(url, dict(query or {}), iter(pieces), frame_s, key=key,
                         speed=speed, on_message=on_message)


async def _stream(
    url: str, params: dict[str, Any], sent: Iterator[tuple[bytes, float]], frame_s: float, *,
    key: str | None, fast: bool = False, speed: float = 1.0,
    on_message: Callable[[dict[str, Any]], None] | None = None,
) -> StreamResult:
    """The one send/receive loop: `sent` yields (frame, seconds of audio it holds)."""
    params = {k: str(v).lower() if isinstance(v, bool) else v for k, v in params.items()}
    headers = {"Authorization": f"Token {key}"} if key else None
    result = StreamResult(frame_s=frame_s)
    async with connect(f"{url}/v1/listen?{urlencode(params)}", additional_headers=headers,
                       max_size=None) as ws:

        async def receive() -> None:
            async for raw in ws:
                msg = json.loads(raw)
                result.messages.append(msg)
                result.received_at.append(time.monotonic())
                if on_message is not None:
                    on_message(msg)

        reader = asyncio.create_task(receive())
        start = time.monotonic()
        for frame, frame_audio_s in sent:
            await ws.send(frame)
            result.sent_at.append(time.monotonic())
            result.sent_audio_s += frame_audio_s
            result.sent_until.append(result.sent_audio_s)
            if not fast:
                delay = start + result.sent_audio_s / speed - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
        await ws.send(json.dumps({"type": "CloseStream"}))
        await reader
        result.close_code, result.close_reason = ws.close_code, ws.close_reason or ""
    return result


def format_final(msg: dict[str, Any]) -> list[str]:
    """`[12.3s] speaker 1: words…` lines for one final Results (a line per speaker run)."""
    words = msg["channel"]["alternatives"][0]["words"]
    lines: list[str] = []
    run: list[dict[str, Any]] = []
    for w in [*words, None]:
        if run and (w is None or w.get("speaker") != run[0].get("speaker")):
            who = run[0].get("speaker")
            label = f"speaker {who}" if who is not None else "speaker ?"
            text = " ".join(x.get("punctuated_word") or x["word"] for x in run)
            lines.append(f"[{run[0]['start']:.1f}s] {label}: {text}")
            run = []
        if w is not None:
            run.append(w)
    return lines


def format_turn(msg: dict[str, Any]) -> str:
    """`[1.0s-2.5s] speaker 0` for one SpeakerTurn."""
    return f"[{msg['start']:.1f}s-{msg['end']:.1f}s] speaker {msg['speaker']}"


def show(msg: dict[str, Any], out: TextIO | None = None, err: TextIO | None = None) -> None:
    """Print one received message as `edge stream` does: final Results as `format_final`
    lines and final SpeakerTurns as `format_turn` on `out` (default stdout), the daemon's
    Error descriptions on `err` (default stderr), nothing for the rest."""
    kind = msg.get("type")
    if kind == "Results" and msg.get("is_final"):
        for line in format_final(msg):
            print(line, file=out or sys.stdout, flush=True)
    elif kind == "SpeakerTurn" and msg.get("is_final"):
        print(format_turn(msg), file=out or sys.stdout, flush=True)
    elif kind == "Error":
        print(f"edge: daemon says: {msg.get('description')}", file=err or sys.stderr, flush=True)


def rttm_from_messages(messages: list[dict[str, Any]], file_id: str) -> list[str]:
    """RTTM lines (`files.segment_lines`) of a session's speakers: from final SpeakerTurns
    when present, else from labelled final words (consecutive words of one speaker less
    than `WORD_GAP_S` apart merged)."""
    segments: list[tuple[float, float, int]] = [
        (m["start"], m["end"], m["speaker"])
        for m in messages if m.get("type") == "SpeakerTurn" and m.get("is_final")
    ]
    if not segments:
        for m in messages:
            if m.get("type") != "Results" or not m.get("is_final"):
                continue
            for w in m["channel"]["alternatives"][0]["words"]:
                if w.get("speaker") is None:
                    continue
                last = segments[-1] if segments else None
                if last and last[2] == w["speaker"] and w["start"] - last[1] < WORD_GAP_S:
                    segments[-1] = (last[0], w["end"], w["speaker"])
                else:
                    segments.append((w["start"], w["end"], w["speaker"]))
    return segment_lines(segments, file_id)


def write_outputs(result: StreamResult, path: Path, jsonl: Path | None, rttm: Path | None) -> None:
    """Write what `edge stream` was asked for: every message as JSON lines to `jsonl`, the
    speaker segments as RTTM (file id: the audio's stem) to `rttm`. Raises `OSError`."""
    if jsonl is not None:
        jsonl.write_text("".join(json.dumps(m) + "\n" for m in result.messages))
    if rttm is not None:
        lines = rttm_from_messages(result.messages, path.stem)
        rttm.write_text("".join(line + "\n" for line in lines))


__all__ = ["StreamResult", "format_final", "format_turn", "read_audio", "rttm_from_messages",
           "show", "stream_audio", "stream_encoded", "timed_pieces", "write_outputs"]
