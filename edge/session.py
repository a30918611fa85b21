"""One client stream on `/v1/listen`: audio in -> upstream + diarizer -> labelled results out.

A session is a small pipeline on one clock (session seconds):

    receive loop --AudioBlock--> upstream queue --> upstream.stream() --events--> results
                             \\-> diarizer.push()  --> SpeakerTimeline --labels--/
    results/turns --> outbound queue --> sender --> client

Queues and their overflow policies (all bounded):
- upstream queue (`UPSTREAM_QUEUE_S` of audio): the upstream drains it continuously into its
  own bounded replay buffer, so it only fills if the upstream task stalls; then the OLDEST
  audio is dropped, counted in `edge_queue_dropped{queue="upstream"}`, and the client gets an
  `Error` saying how many seconds went untranscribed.
- diarizer: the engine's own per-session bound (catch-up policy in edge/diarization/engine.py).
- outbound queue (`OUTBOUND_MAX` messages): a client that stops reading fills it; the session
  is then closed with 1008 "client not reading" so it cannot hold memory or other sessions up.

A final result waits at most `EDGE_LABEL_WAIT_MS` for the diarizer to cover its last word,
then goes out with whatever labels exist (`speaker: null` where unknown).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from edge import __version__, protocol
from edge.audio import DecodeError, SessionAudio
from edge.health import Status
from edge.limits import TokenBucket
from edge.metrics import Metrics
from edge.protocol import ListenParams, ModelInfo
from edge.settings import Settings
from edge.stt.base import FLUSH, AudioBlock, AudioItem, StreamConfig, TranscriptEvent, Upstream, Word

if TYPE_CHECKING:
    from edge.diarization.engine import DiarizationEngine
    from edge.diarization.session import DiarizerSession

log = logging.getLogger("edge.session")

UPSTREAM_QUEUE_S = 10.0
MIN_QUEUED_SAMPLES = 320  # 20 ms: smaller blocks are joined before the upstream queue
OUTBOUND_MAX = 512
FINISH_TIMEOUT_S = 15.0  # how long CloseStream waits for the upstream's last finals
TURNS_INTERVAL_S = 0.25  # how often growing SpeakerTurns are reported
FLOOD_CLOSE_S = 1.0  # how long a client cut off for flooding has to answer our close
FRAME_BURST_S = 1.0  # a burst of up to one second's worth of frames over EDGE_MAX_FRAMES_PER_S
# Finalize bound: each one half-closes the Google call. Beyond it a Finalize is refused with
# an Error (nothing is lost: the audio is finalized anyway, by the next Finalize or the end).
FINALIZE_PER_S, FINALIZE_BURST = 2.0, 10

End = Literal["close", "shutdown", "idle", "gone", "too_large", "slow", "bad_audio", "too_fast"]
_END_CLOSE: dict[End, tuple[int, str]] = {
    "close": (protocol.CLOSE_NORMAL, ""),
    "shutdown": (protocol.CLOSE_GOING_AWAY, protocol.REASON_SHUTDOWN),
    "idle": (protocol.CLOSE_INTERNAL, protocol.REASON_IDLE),
    "too_large": (protocol.CLOSE_POLICY, protocol.REASON_FRAME_TOO_LARGE),
    "slow": (protocol.CLOSE_POLICY, protocol.REASON_NOT_READING),
    "bad_audio": (protocol.CLOSE_POLICY, protocol.REASON_BAD_AUDIO),
    "too_fast": (protocol.CLOSE_POLICY, protocol.REASON_TOO_MANY_FRAMES),
    "gone": (protocol.CLOSE_NORMAL, ""),
}


@dataclass
class SessionDeps:
    """What every session shares: built once by the app."""

    settings: Settings
    status: Status
    metrics: Metrics
    upstream: Upstream | None
    engine: DiarizationEngine | None


_END_OF_AUDIO = object()


class Session:
    def __init__(
        self, conn: ServerConnection, params: ListenParams, deps: SessionDeps, request_id: str
    ) -> None:
        self.conn = conn
        self.params = params
        self.deps = deps
        self.request_id = request_id
        s = deps.settings
        self.audio = SessionAudio(params.encoding, params.sample_rate,
                                  decode_timeout_s=s.edge_decode_timeout_s)
        self.config = StreamConfig(
            language=params.language or s.edge_stt_language,
            model=params.model or s.edge_stt_model,
            interim_results=params.interim_results,
            punctuate=params.punctuate or params.smart_format,
            diarize=params.diarize,
            vad_events=params.vad_events or params.utterance_end_ms is not None,
            max_speakers=s.stt_nemo_diarization_max_speakers,
        )
        arch = f"google-speech-{s.edge_stt_api}" if deps.upstream is not None else "none"
        self.model = ModelInfo(self.config.model, __version__, arch)
        self.diarizer_model = ModelInfo("diar_streaming_sortformer_4spk-v2.1", __version__, "sortformer")
        self.last_activity = time.monotonic()
        rate = s.edge_max_frames_per_s
        self._frames = TokenBucket(rate, rate * FRAME_BURST_S, self.last_activity)
        self._finalizes = TokenBucket(FINALIZE_PER_S, FINALIZE_BURST, self.last_activity)
        self.created = datetime.now(timezone.utc)
        self._end: End | None = None
        self._recv_task: asyncio.Task[End] | None = None
        self._out: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(OUTBOUND_MAX)
        self._audio_q: asyncio.Queue[Any] = asyncio.Queue(
            max(4, int(UPSTREAM_QUEUE_S * 50))  # blocks of >= 20 ms
        )
        self._upstream_alive = deps.upstream is not None
        self._held: AudioBlock | None = None  # audio under MIN_QUEUED_SAMPLES, not yet queued
        self._google_labels = False
        self._finalize_pending = 0
        self._finals_since_finalize = 0
        self._speaker_map: dict[str, int] = {}  # Google's labels -> 0-based arrival order
        self._last_word_end = 0.0
        self.diar: DiarizerSession | None = None
        self._wants_turns = False

    # --- lifecycle ---
    async def run(self) -> End:
        """Serve the session until it ends; returns why it ended."""
        deps = self.deps
        if deps.upstream is not None and self.params.diarize:
            caps = deps.upstream.capabilities(self.config)
            self._google_labels = caps.diarization
        wants_local = self.params.speaker_turns or deps.upstream is None or (
            self.params.diarize and not self._google_labels
        )
        if wants_local and deps.engine is not None:
            if deps.engine.final:  # off or broken for good: hold nothing
                # Broken is news to the client; switched off by the operator is not.
                if deps.engine.state != "disabled" and (
                    self.params.diarize or self.params.speaker_turns
                ):
                    self._send(protocol.error_message(
                        "DIARIZATION_UNAVAILABLE",
                        f"local speaker labels unavailable: {deps.engine.reason}"))
            else:
                self.diar = deps.engine.open_session(self.request_id)
        sender = asyncio.create_task(self._send_loop(), name=f"send-{self.request_id}")
        workers = []
        upstream_task = None
        if deps.upstream is not None:
            upstream_task = asyncio.create_task(self._upstream_loop(), name="upstream")
            workers.append(upstream_task)
        self._wants_turns = self.diar is not None and (
            self.params.speaker_turns or deps.upstream is None)
        if self._wants_turns:
            workers.append(asyncio.create_task(self._turns_loop(), name="turns"))
        self._recv_task = asyncio.create_task(self._receive_loop(), name=f"recv-{self.request_id}")
        end: End = "gone"
        try:
            try:
                end = await self._recv_task
            except asyncio.CancelledError:
                if self._end is None:  # not ours: the server is going down hard
                    raise
                end = self._end
            self._end = end
            await self._finish(end, upstream_task)
        finally:
            self.audio.close()
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            if self.diar is not None:
                with contextlib.suppress(Exception):
                    await self.diar.close()
            await self._close_connection(end, sender)
        return end

    def end(self, reason: End) -> None:
        """Ask the session to end (idle reaper, drain, a slow client); idempotent."""
        if self._end is None:
            self._end = reason
            if self._recv_task is not None:
                self._recv_task.cancel()

    async def _finish(self, end: End, upstream: asyncio.Task[None] | None) -> None:
        """Flush what the client is owed: every final result, turns, then Metadata."""
        if end in ("gone", "too_large", "slow", "bad_audio", "too_fast"):
            return
        await self._end_of_audio()
        if self._upstream_alive:
            self._put_audio(self._take_held())
            self._put_audio(_END_OF_AUDIO)
        if self.diar is not None:
            with contextlib.suppress(Exception):
                await self.diar.close()  # places the last frames and ends open turns
            if self._wants_turns:
                self._send_turns()
        timeout = FINISH_TIMEOUT_S if end == "close" else self.deps.settings.edge_drain_s
        if upstream is not None and not (await asyncio.wait({upstream}, timeout=timeout))[0]:
            log.warning("session %s: upstream did not finish within %.0f s", self.request_id, timeout)
        if end in ("close", "shutdown"):
            self._send(protocol.metadata_message(
                request_id=self.request_id, duration=self.audio.duration,
                sha256=self.audio.sha256, created=self.created,
                models=[self.model] + ([self.diarizer_model] if self.diar else []),
            ))

    async def _close_connection(self, end: End, sender: asyncio.Task[None]) -> None:
        code, reason = _END_CLOSE[end]
        if end not in ("gone", "slow"):
            with contextlib.suppress(asyncio.QueueFull):
                self._out.put_nowait(None)
            with contextlib.suppress(asyncio.TimeoutError, ConnectionClosed):
                await asyncio.wait_for(asyncio.shield(sender), 5.0)
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
            await sender
        # A flooding client's answer to our close waits behind its own frames, which we no
        # longer read: give it a moment, then drop the connection rather than hold the slot.
        timeout = FLOOD_CLOSE_S if end in ("too_fast", "too_large") else None
        with contextlib.suppress(ConnectionClosed, asyncio.TimeoutError):
            await asyncio.wait_for(self.conn.close(code, reason), timeout)
        if self.conn.state is not State.CLOSED:
            self.conn.transport.abort()

    # --- input ---
    async def _receive_loop(self) -> End:
        max_frame = self.deps.settings.edge_max_frame_bytes
        try:
            async for message in self.conn:
                if isinstance(message, bytes):
                    if not message:
                        return await self._end_of_audio()
                    if len(message) > max_frame:
                        return "too_large"
                    self.last_activity = time.monotonic()
                    if not self._frames.take(self.last_activity):
                        self._send(protocol.error_message(
                            "TOO_MANY_FRAMES", f"more than {self._frames.rate:g} audio frames "
                            "per second (EDGE_MAX_FRAMES_PER_S): send 20-250 ms per frame"))
                        return "too_fast"
                    try:
                        block = await self.audio.decode(message)
                    except DecodeError as exc:
                        self._bad_audio(exc)
                        return "bad_audio"
                    if block is not None:
                        self._on_audio(block)
                    continue
                try:
                    control = protocol.parse_control(message)
                except protocol.ControlError as exc:
                    self._send(protocol.error_message("INVALID_MESSAGE", str(exc)))
                    continue
                self.last_activity = time.monotonic()
                if control == "CloseStream":
                    return await self._end_of_audio()
                if control == "Finalize":
                    self._finalize()
        except ConnectionClosed:
            return "gone"
        return "gone"  # the client closed without CloseStream

    async def _end_of_audio(self) -> End:
        """The decoder's and resampler's tail onto the clock (idempotent): "close", or
        "bad_audio" when the stream turns out undecodable at its end (e.g. truncated)."""
        try:
            tail = await self.audio.finish()
        except DecodeError as exc:
            self._bad_audio(exc)
            return "bad_audio"
        if tail is not None:
            self._on_audio(tail)
        return "close"

    def _bad_audio(self, exc: DecodeError) -> None:
        log.info("session %s: undecodable audio: %s", self.request_id, exc)
        self._send(protocol.error_message(
            protocol.REASON_BAD_AUDIO, f"The payload cannot be decoded as audio: {exc}"))

    def _on_audio(self, block: AudioBlock) -> None:
        self.deps.metrics.audio_seconds.inc(block.samples / 16000)
        if self._upstream_alive:
            # The upstream queue is bounded in blocks: hold tiny ones until they make 20 ms,
            # so its bound means seconds whatever the client's frame size.
            if self._held is not None:
                block = AudioBlock(self._held.start, self._held.pcm + block.pcm)
                self._held = None
            if block.samples < MIN_QUEUED_SAMPLES:
                self._held = block
            else:
                self._put_audio(block)
        if self.diar is not None:
            self.diar.push(block)

    def _take_held(self) -> AudioBlock | None:
        held, self._held = self._held, None
        return held

    def _put_audio(self, item: object) -> None:
        if item is None:
            return
        try:
            self._audio_q.put_nowait(item)
        except asyncio.QueueFull:
            # Overflow policy: drop the oldest audio, keep the newest (see module doc).
            dropped = self._audio_q.get_nowait()
            self._audio_q.put_nowait(item)
            if isinstance(dropped, AudioBlock):
                self.deps.metrics.queue_dropped.labels("upstream").inc()
                self._send(protocol.error_message(
                    "AUDIO_DROPPED",
                    f"upstream stalled: {dropped.end_s - dropped.start_s:.2f} s of audio at "
                    f"{dropped.start_s:.2f} s were not transcribed",
                ))

    def _finalize(self) -> None:
        if not self._finalizes.take(time.monotonic()):
            self._send(protocol.error_message(
                "FINALIZE_RATE_LIMITED", f"Finalize ignored: at most {FINALIZE_PER_S:g} per "
                f"second (bursts of {FINALIZE_BURST}); the audio is still transcribed"))
            return
        if self._upstream_alive:
            self._finalize_pending += 1
            self._finals_since_finalize = 0
            self._put_audio(self._take_held())
            self._put_audio(FLUSH)
        else:
            self._send_empty_final(from_finalize=True)

    async def _upstream_audio(self) -> AsyncIterator[AudioItem]:
        while True:
            item = await self._audio_q.get()
            if item is _END_OF_AUDIO:
                return
            yield item

    # --- output ---
    async def _upstream_loop(self) -> None:
        assert self.deps.upstream is not None
        try:
            async for event in self.deps.upstream.stream(self._upstream_audio(), self.config):
                await self._on_event(event)
        except Exception as exc:  # an upstream bug must not take the session down
            log.exception("session %s: upstream failed", self.request_id)
            self._send(protocol.error_message("UPSTREAM_FAILED", f"transcription stopped: {exc}"))
        finally:
            self._upstream_alive = False

    async def _on_event(self, ev: TranscriptEvent) -> None:
        p = self.params
        if ev.kind == "result":
            if ev.is_final:
                await self._on_final(ev)
            elif p.interim_results:
                self._send(self._results(ev, self._label(ev.words)))
        elif ev.kind == "speech_started" and p.vad_events:
            self._send(protocol.speech_started_message(ev.start))
        elif ev.kind == "speech_ended" and p.utterance_end_ms is not None:
            self._send(protocol.utterance_end_message(self._last_word_end))
        elif ev.kind == "flushed" and self._finalize_pending:
            self._finalize_pending -= 1
            if not self._finals_since_finalize:
                self._send_empty_final(from_finalize=True)
        elif ev.kind == "error":
            variant = "UPSTREAM_AUDIO_LOST" if ev.lost_s else "UPSTREAM_ERROR"
            self._send(protocol.error_message(variant, ev.message or "upstream error",
                                              lost_s=round(ev.lost_s, 3)))
            if ev.lost_s:
                self.deps.metrics.upstream_lost_seconds.inc(ev.lost_s)
                self.deps.status.notice("upstream", f"session {self.request_id}: {ev.message}")
            if ev.fatal:
                self._upstream_alive = False

    async def _on_final(self, ev: TranscriptEvent) -> None:
        if ev.words and self.diar is not None and not self._google_labels:
            wait = self.deps.settings.edge_label_wait_ms / 1000
            await self.diar.wait_covered(ev.words[-1].end, wait)
        labelled = self._label(ev.words)
        self._finals_since_finalize += 1
        self._send(self._results(ev, labelled, from_finalize=self._finalize_pending > 0))
        if ev.words:
            self._last_word_end = ev.words[-1].end
            received = self.audio.received_at(ev.words[-1].end)
            if received is not None:
                self.deps.metrics.final_latency.observe(time.monotonic() - received)
        if ev.speech_final and self.params.utterance_end_ms is not None and ev.words:
            self._send(protocol.utterance_end_message(self._last_word_end))

    def _label(self, words: tuple[Word, ...]) -> tuple[list[dict[str, Any]], str | None]:
        """Words with speakers, and where the labels came from. Local labels count wherever
        the timeline covers the words — also after the diarizer closed or degraded, since
        frames already placed stay valid."""
        source: str | None = None
        if self._google_labels:
            source = "google"
        elif self.diar is not None and words and self.diar.timeline.covered_until >= words[-1].end:
            source = "sortformer"
        out = []
        for w in words:
            speaker: int | None = None
            conf: float | None = None
            if source == "google" and w.speaker_label is not None:
                speaker = self._speaker_map.setdefault(w.speaker_label, len(self._speaker_map))
            elif source == "sortformer" and self.diar is not None:
                speaker, conf = self.diar.timeline.speaker_for(w.start, w.end)
            out.append(protocol.word_entry(w.word, w.start, w.end, w.confidence,
                                           w.punctuated_word, speaker, conf))
        return out, source

    def _results(
        self, ev: TranscriptEvent, labelled: tuple[list[dict[str, Any]], str | None],
        from_finalize: bool = False,
    ) -> dict[str, Any]:
        words, source = labelled
        message = protocol.results_message(
            request_id=self.request_id, model=self.model, start=ev.start, end=ev.end,
            is_final=ev.is_final, speech_final=ev.speech_final, from_finalize=from_finalize,
            transcript=ev.transcript, confidence=ev.confidence, words=words,
            speaker_source=source if self.params.diarize else None,
            diarizer=self.diarizer_model if source == "sortformer" else None,
        )
        if source is None and self.params.diarize and words:
            # Extension: why these words carry no speaker (loading, refused, degraded, ...).
            message["speaker_note"] = (
                self.diar.reason or f"local diarizer {self.diar.state}" if self.diar is not None
                else "no speaker labels for this model and language")
        return message

    def _send_empty_final(self, from_finalize: bool) -> None:
        now = self.audio.clock
        ev = TranscriptEvent(kind="result", start=now, end=now, is_final=True)
        self._send(self._results(ev, ([], None), from_finalize=from_finalize))

    async def _turns_loop(self) -> None:
        """SpeakerTurn messages from the local diarizer (diarization-only mode, or asked)."""
        while True:
            await asyncio.sleep(TURNS_INTERVAL_S)
            self._send_turns()

    def _send_turns(self) -> None:
        assert self.diar is not None
        for turn in self.diar.timeline.pop_turns():
            self._send(protocol.speaker_turn_message(
                turn.speaker, turn.start, turn.end, turn.is_final))

    def _send(self, message: dict[str, Any]) -> None:
        try:
            self._out.put_nowait(message)
        except asyncio.QueueFull:
            self.deps.metrics.queue_dropped.labels("outbound").inc()
            self.end("slow")

    async def _send_loop(self) -> None:
        while True:
            message = await self._out.get()
            if message is None:
                return
            await self.conn.send(json.dumps(message, separators=(",", ":")))
