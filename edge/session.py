"""One client stream on `/v1/listen`: audio in -> one pipeline per channel -> messages out.

A session is a small pipeline on one clock (session seconds):

    receive loop --AudioBlock per channel--> Channel (edge/channel.py): upstream + diarizer
    channels' results, turns, end-of-speech --> outbound queue --> sender --> client

What it does is its `Plan` (edge/plan.py): one pure decision from the query, the settings and
the upstream's capabilities. Queues and their overflow policies (all bounded):
- per channel: the upstream run's replay buffer and the diarizer's backlog (edge/channel.py);
- outbound queue (`OUTBOUND_MAX` messages): a client that stops reading fills it; the session
  is then closed with 1008 "client not reading" so it cannot hold memory or other sessions up.

A final result waits at most `EDGE_LABEL_WAIT_MS` for the diarizer to cover its last word
(only when the client asked for labels and they are local), then goes out with whatever
labels exist (`speaker: null` where unknown).

Life (`SessionState`, changed only by `Session.run`, each step checking the state it leaves):
NEW -> RECEIVING (the client's audio and controls) -> FINISHING (the audio ended: flush every
final the client is owed) -> CLOSING (the websocket) -> CLOSED. `end(reason)` asks a RECEIVING
session to end (the first reason wins); once FINISHING it is already ending and is left alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Literal

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from edge import __version__, protocol
from edge.audio import DecodeError, SessionAudio
from edge.channel import Channel, ChannelContext
from edge.clock import SAMPLE_RATE, AudioBlock
from edge.formats import DecoderLost
from edge.health import Status
from edge.limits import TokenBucket
from edge.metrics import Metrics
from edge.plan import plan_session
from edge.protocol import ListenParams, ModelInfo
from edge.settings import Settings
from edge.stt.base import Upstream

if TYPE_CHECKING:
    from edge.decode_process import DecoderProcess
    from edge.diarization.engine import DiarizationEngine

log = logging.getLogger("edge.session")

OUTBOUND_MAX = 512
FINISH_TIMEOUT_S = 15.0  # how long CloseStream waits for the upstream's last finals
FLOOD_CLOSE_S = 1.0  # how long a client cut off for flooding has to answer our close
FRAME_BURST_S = 1.0  # a burst of up to one second's worth of frames over EDGE_MAX_FRAMES_PER_S
# Finalize bound: each one half-closes the Google call. Beyond it a Finalize is refused with
# an Error (nothing is lost: the audio is finalized anyway, by the next Finalize or the end).
FINALIZE_PER_S, FINALIZE_BURST = 2.0, 10

End = Literal["close", "shutdown", "idle", "gone", "too_large", "slow", "bad_audio", "too_fast",
              "decoder_lost"]
_END_CLOSE: dict[End, tuple[int, str]] = {
    "close": (protocol.CLOSE_NORMAL, ""),
    "shutdown": (protocol.CLOSE_GOING_AWAY, protocol.REASON_SHUTDOWN),
    "idle": (protocol.CLOSE_INTERNAL, protocol.REASON_IDLE),
    "too_large": (protocol.CLOSE_POLICY, protocol.REASON_FRAME_TOO_LARGE),
    "slow": (protocol.CLOSE_POLICY, protocol.REASON_NOT_READING),
    "bad_audio": (protocol.CLOSE_POLICY, protocol.REASON_BAD_AUDIO),
    "decoder_lost": (protocol.CLOSE_INTERNAL, protocol.REASON_DECODER_LOST),
    "too_fast": (protocol.CLOSE_POLICY, protocol.REASON_TOO_MANY_FRAMES),
    "gone": (protocol.CLOSE_NORMAL, ""),
}


class SessionState(StrEnum):
    """Where a session is in its life (the module docstring)."""

    NEW = "new"
    RECEIVING = "receiving"
    FINISHING = "finishing"
    CLOSING = "closing"
    CLOSED = "closed"


class InvalidSessionTransition(RuntimeError):
    """A session asked to move from a state it is not in (e.g. `run()` twice)."""

    def __init__(self, state: SessionState, to: SessionState) -> None:
        super().__init__(f"session cannot go from {state} to {to}")
        self.state, self.to = state, to


@dataclass
class SessionDeps:
    """What every session shares: built once by the app."""

    settings: Settings
    status: Status
    metrics: Metrics
    upstream: Upstream | None
    engine: DiarizationEngine | None
    # Decodes containers and compressed codecs in its own process; None: in the daemon's
    # (tests that drive sessions without an app).
    decoders: DecoderProcess | None = None


class Session:
    def __init__(
        self, conn: ServerConnection, params: ListenParams, deps: SessionDeps, request_id: str
    ) -> None:
        self.conn = conn
        self.params = params
        self.deps = deps
        self.request_id = request_id
        s = deps.settings
        caps = deps.upstream.capabilities if deps.upstream is not None else None
        self.plan = plan_session(params, s, caps)
        self.audio = SessionAudio(params.encoding, params.sample_rate, channels=params.channels,
                                  split=self.plan.channels > 1,
                                  decode_timeout_s=s.edge_decode_timeout_s,
                                  decoders=deps.decoders.decoder if deps.decoders else None)
        arch = f"google-speech-{s.edge_stt_api}" if deps.upstream is not None else "none"
        model = self.plan.upstream.model if self.plan.upstream is not None else s.edge_stt_model
        self.model = ModelInfo(model, __version__, arch)
        self.diarizer_model = ModelInfo("diar_streaming_sortformer_4spk-v2.1", __version__, "sortformer")
        self.last_activity = time.monotonic()
        rate = s.edge_max_frames_per_s
        self._frames = TokenBucket(rate, rate * FRAME_BURST_S, self.last_activity)
        self._finalizes = TokenBucket(FINALIZE_PER_S, FINALIZE_BURST, self.last_activity)
        self.created = datetime.now(timezone.utc)
        self._state = SessionState.NEW
        self._end: End | None = None  # why it ends, once asked to or the client stopped
        self._recv_task: asyncio.Task[End] | None = None
        self._out: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(OUTBOUND_MAX)
        ctx = ChannelContext(
            request_id=request_id, params=params, plan=self.plan, settings=s, status=deps.status,
            metrics=deps.metrics, upstream=deps.upstream, engine=deps.engine, audio=self.audio,
            model=self.model, diarizer_model=self.diarizer_model, send=self._send)
        self.channels = [Channel(ctx, i, self.plan.channels) for i in range(self.plan.channels)]

    # --- lifecycle ---
    @property
    def state(self) -> SessionState:
        return self._state

    async def run(self) -> End:
        """Serve the session until it ends; returns why it ended. Raises `InvalidSessionTransition`
        if it already ran."""
        self._become(SessionState.RECEIVING, SessionState.NEW)
        if self.params.ignored:
            log.warning("session %s: accepted but not honoured: %s", self.request_id,
                        ", ".join(self.params.ignored)[:500])
        sender = asyncio.create_task(self._send_loop(), name=f"send-{self.request_id}")
        for channel in self.channels:
            channel.start()
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
            self._become(SessionState.FINISHING, SessionState.RECEIVING)
            await self._finish(end)
        finally:
            self._become(SessionState.CLOSING, SessionState.RECEIVING, SessionState.FINISHING)
            self.audio.close()
            await asyncio.gather(*(c.stop() for c in self.channels), return_exceptions=True)
            await self._close_connection(end, sender)
            self._become(SessionState.CLOSED, SessionState.CLOSING)
        return end

    def end(self, reason: End) -> None:
        """Ask a receiving session to end (idle reaper, drain, a slow client); idempotent: the
        first reason wins, and a session already finishing or closing is left alone."""
        if self._end is None and self._state in (SessionState.NEW, SessionState.RECEIVING):
            self._end = reason
            if self._recv_task is not None:
                self._recv_task.cancel()

    def _become(self, to: SessionState, *leaving: SessionState) -> None:
        if self._state not in leaving:
            raise InvalidSessionTransition(self._state, to)
        self._state = to

    @property
    def diarizing(self) -> bool:
        """Whether any channel holds a local diarizer session."""
        return any(c.diar is not None for c in self.channels)

    async def _finish(self, end: End) -> None:
        """Flush what the client is owed: every final result, turns, then Metadata."""
        if end in ("gone", "too_large", "slow", "bad_audio", "too_fast"):
            return
        if end != "decoder_lost":  # else the decoder has no tail to give
            await self._end_of_audio()
        timeout = FINISH_TIMEOUT_S if end == "close" else self.deps.settings.edge_drain_s
        await asyncio.gather(*(c.finish(timeout) for c in self.channels))
        if end in ("close", "shutdown"):
            self._send(protocol.metadata_message(
                request_id=self.request_id, duration=self.audio.duration,
                sha256=self.audio.sha256, created=self.created,
                models=[self.model] + ([self.diarizer_model] if self.diarizing else []),
                channels=self.params.channels,
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
                        self._on_audio(await self.audio.decode(message))
                    except DecodeError as exc:
                        return self._undecodable(exc)
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
                elif control == "Configure":
                    self._send(protocol.configure_reply(message, self.request_id))
        except ConnectionClosed:
            return "gone"
        return "gone"  # the client closed without CloseStream

    async def _end_of_audio(self) -> End:
        """The decoder's and resamplers' tails onto the clock (idempotent): "close", or
        "bad_audio" when the stream turns out undecodable at its end (e.g. truncated)."""
        try:
            self._on_audio(await self.audio.finish())
        except DecodeError as exc:
            return self._undecodable(exc)
        return "close"

    def _undecodable(self, exc: DecodeError) -> End:
        """Tell the client why its audio stops here: "decoder_lost" when the decoder itself
        failed (`DecoderLost`), else "bad_audio"."""
        if isinstance(exc, DecoderLost):
            log.warning("session %s: decoder lost: %s", self.request_id, exc)
            self._send(protocol.error_message(
                "DECODER_UNAVAILABLE", f"The audio decoder failed ({exc}), not the audio: the "
                "finals for the audio before it follow, then the connection closes (1011). "
                "Reconnect to go on."))
            return "decoder_lost"
        log.info("session %s: undecodable audio: %s", self.request_id, exc)
        self._send(protocol.error_message(
            protocol.REASON_BAD_AUDIO, f"The payload cannot be decoded as audio: {exc}"))
        return "bad_audio"

    def _finalize(self) -> None:
        if not self._finalizes.take(time.monotonic()):
            self._send(protocol.error_message(
                "FINALIZE_RATE_LIMITED", f"Finalize ignored: at most {FINALIZE_PER_S:g} per "
                f"second (bursts of {FINALIZE_BURST}); the audio is still transcribed"))
            return
        for channel in self.channels:
            channel.finalize()

    def _on_audio(self, blocks: list[AudioBlock]) -> None:
        if not blocks:
            return
        self.deps.metrics.audio_seconds.inc(blocks[0].samples / SAMPLE_RATE)
        for channel, block in zip(self.channels, blocks, strict=True):
            channel.push(block)

    # --- output ---
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
