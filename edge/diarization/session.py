"""`DiarizerSession`: one client session's stream to the local diarizer, and its state.

The session code uses only the public part: `state`, `reason`, `timeline`, `push()`,
`wait_covered()`, `close()`. The engine (edge/diarization/engine.py) decides admission and routes
the worker's replies here through the transition methods below.

States (`DiarizerState`; only this class changes it, and every transition checks the state it
leaves, raising `InvalidDiarizerTransition` on an illegal one):
- ACTIVE: admitted; frames flow into `timeline` (labels may lag by the model's latency).
- REFUSED: the worker is full (memory budget, or as many sessions as it can step in real
  time). Admitted automatically, in order of opening, as soon as another session frees a slot
  (its audio before then stays unlabelled).
- DEGRADED: admitted, but labels are null for now — a step exceeded the timeout, a step
  failed, or the worker is restarting (`cause`; `reason` says it in words). Returns to ACTIVE
  by itself when labels flow again; after a new stream starts, its speakers get new numbers.
- UNAVAILABLE: the engine cannot label now: loading or restarting ("diarizer loading",
  "diarizer restarting": admitted once the worker is ready), or for good (disabled, NeMo
  missing, model missing or broken, worker unable to start); see `reason`.
- CLOSING: `close()` is flushing the stream (at most STT_NEMO_DIARIZATION_TIMEOUT_S).
- CLOSED: after `close()`, or when the engine shut down.

Transitions (method: from -> to):
    wait        UNAVAILABLE | REFUSED -> UNAVAILABLE
    admit       UNAVAILABLE | REFUSED -> ACTIVE;  DEGRADED without a stream -> DEGRADED
    refuse      UNAVAILABLE | REFUSED | DEGRADED without a stream -> REFUSED
    too_slow    ACTIVE -> DEGRADED (timeout)
    stream_lost ACTIVE | DEGRADED with a stream -> DEGRADED (error | restart); CLOSING: stops waiting
    (frames)    DEGRADED -> ACTIVE once labels flow again
    give_up     UNAVAILABLE | REFUSED | ACTIVE | DEGRADED -> UNAVAILABLE; CLOSING: stops waiting
    close()     any but CLOSING | CLOSED -> CLOSING, then CLOSED
    shut        any but CLOSED -> CLOSED
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from enum import StrEnum
from typing import Any, Protocol

import numpy as np

from edge.clock import AudioBlock, overlap
from edge.diarization.feed import SessionFeed
from edge.diarization.timeline import SpeakerTimeline
from edge.diarization.wire import Kind


class DiarizerState(StrEnum):
    """What a session gets of the diarizer (the module docstring says what each means)."""

    UNAVAILABLE = "unavailable"
    REFUSED = "refused"
    ACTIVE = "active"
    DEGRADED = "degraded"
    CLOSING = "closing"
    CLOSED = "closed"


class DegradedCause(StrEnum):
    """Why a session is DEGRADED: it decides when labels count as back."""

    TIMEOUT = "timeout"  # back once nothing sent is older than the timeout
    ERROR = "error"  # back at the new stream's first frames
    RESTART = "restart"  # idem, after the worker restarted


class InvalidDiarizerTransition(RuntimeError):
    """A transition asked of a session in a state it cannot leave that way (a bug of ours)."""

    def __init__(self, session_id: str, state: DiarizerState, transition: str) -> None:
        super().__init__(f"diarizer session {session_id}: cannot {transition} while {state}")
        self.session_id, self.state, self.transition = session_id, state, transition


class WorkerLink(Protocol):
    """The worker's pipe as a session uses it (`WorkerSupervisor` is one)."""

    @property
    def ready(self) -> bool: ...  # a loaded worker takes streams

    def send(self, kind: Kind, meta: dict[str, Any] | None = None, array: Any = None) -> bool: ...


class Host(Protocol):
    """What a session tells its engine (`DiarizationEngine` is one)."""

    def skipped(self, session: DiarizerSession, frames: int) -> None: ...  # catch-up dropped audio

    def release(self, session: DiarizerSession) -> None: ...  # close() is done: free the slot


U, R, A, D, C = (DiarizerState.UNAVAILABLE, DiarizerState.REFUSED, DiarizerState.ACTIVE,
                 DiarizerState.DEGRADED, DiarizerState.CLOSING)
HOLDS_SLOT = frozenset({A, D})


class DiarizerSession:
    """One session's view of the diarizer (see the module docstring for `state`).

    `feed` holds its audio on the way to the worker, `worker` is the pipe, `host` the engine.
    `timeout_s` is STT_NEMO_DIARIZATION_TIMEOUT_S; `max_inflight` the units it may have in the
    worker's pipe at once (flow control).
    """

    def __init__(self, session_id: str, feed: SessionFeed, worker: WorkerLink, host: Host, *,
                 timeout_s: float, max_inflight: int) -> None:
        self.id = session_id
        self.reason: str | None = None
        self.cause: DegradedCause | None = None
        self.timeline = SpeakerTimeline()
        self.history: deque[tuple[DiarizerState, str | None]] = deque(maxlen=16)  # diagnostics
        self.feed = feed
        self._sid: str | None = None
        self._state = U
        self._worker, self._host = worker, host
        self._timeout_s, self._max_inflight = timeout_s, max_inflight
        self._closing_from: DiarizerState | None = None  # the state CLOSING left
        self._close_sent: float | None = None
        self._close_done: asyncio.Future[None] | None = None
        self._changed: asyncio.Event | None = None
        self._closer: asyncio.Task[None] | None = None

    @property
    def state(self) -> DiarizerState:
        return self._state

    @property
    def sid(self) -> str | None:
        """The live worker stream's id, if any."""
        return self._sid

    @property
    def admitted(self) -> bool:
        """Whether it holds a slot in the worker's budget (a closing session until released)."""
        return (self._closing_from if self._state is C else self._state) in HOLDS_SLOT

    # --- the session code's side ---
    def push(self, block: AudioBlock) -> None:
        """Hand audio to the diarizer; returns at once, never raises for a live session.

        Bounded: audio waits in this session's backlog while the worker has no credit for it;
        beyond `EDGE_DIARIZATION_MAX_BACKLOG_S` the oldest is skipped and the newest kept
        (catch-up, see edge/diarization/feed.py). Audio is dropped unless the session is
        admitted (active or degraded), and after `close()`.
        """
        if self._state in (C, DiarizerState.CLOSED):
            return
        samples = np.frombuffer(block.pcm, dtype="<i2").astype(np.float32) * (1.0 / 32768.0)
        skipped = self.feed.push(block.start, samples)
        if skipped:
            self._host.skipped(self, skipped)
        self._pump()

    async def wait_covered(self, t: float, timeout: float) -> bool:
        """Wait until the timeline covers session time `t` (seconds), at most `timeout` s.

        Returns True once it does (then ask `timeline.speaker_for`). Returns False at the
        timeout, or at once when it cannot happen soon: labels are not flowing (not ACTIVE,
        nor CLOSING from ACTIVE), or `t` lies in audio the catch-up policy skipped.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if self.timeline.covered_until >= t:
                return True
            remaining = deadline - loop.time()
            flowing = self._state is A or (self._state is C and self._closing_from is A)
            if not flowing or self.feed.is_skipped(t) or remaining <= 0:
                return False
            if self._changed is None:
                self._changed = asyncio.Event()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                return False

    async def close(self) -> None:
        """Flush the audio still queued (the stream's `finish`), place the last frames, end
        every open turn, free the worker's state and this session's slot. Idempotent; waits at
        most `STT_NEMO_DIARIZATION_TIMEOUT_S` for the worker; cancelling the caller does not
        cancel the close."""
        if self._closer is None:
            if self._state is not DiarizerState.CLOSED:  # else the engine shut it first
                self._leave("close", U, R, A, D)
                self._closing_from = self._state
                self._enter(C, self.reason)
            self._closer = asyncio.create_task(self._close())
        await asyncio.shield(self._closer)

    async def _close(self) -> None:
        if self._state is not C:
            return
        if self._sid is not None and self._worker.ready:
            self._pump(flush=True)
            self._close_done = asyncio.get_running_loop().create_future()
            self._close_sent = time.monotonic()
            self._worker.send(Kind.CLOSE, {"sid": self._sid})
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._close_done, self._timeout_s)
        self._host.release(self)

    # --- transitions, for the engine ---
    def wait(self, reason: str) -> None:
        """Not admitted, waiting for a worker (loading or restarting)."""
        self._leave("wait", U, R)
        self._enter(U, reason)

    def admit(self, sid: str) -> None:
        """Open worker stream `sid` for this session and start sending its audio."""
        self._leave("admit", U, R, D)
        if self._sid is not None:
            raise InvalidDiarizerTransition(self.id, self._state, "admit with a stream open")
        self._sid = sid
        self.feed.start_stream()
        # A new stream: its slots name nobody known yet, and audio before it is never labelled.
        self.timeline.skip_to(self.feed.next_frame)
        self.timeline.new_stream()
        self._worker.send(Kind.OPEN, {"sid": sid})
        if self._state is not D:  # a degraded one is ACTIVE again once frames flow
            self._enter(A, None)
        self._pump()

    def refuse(self, reason: str) -> None:
        """No slot: drop the backlog and take no audio until admitted."""
        self._leave("refuse", U, R, D)
        if self._sid is not None:
            raise InvalidDiarizerTransition(self.id, self._state, "refuse with a stream open")
        self.feed.stop()
        self._enter(R, reason)

    def too_slow(self, reason: str) -> None:
        """The oldest unanswered unit is older than the timeout: labels off, stream kept."""
        self._leave("degrade on a timeout", A)
        self._enter(D, reason, DegradedCause.TIMEOUT)

    def stream_lost(self, cause: DegradedCause, reason: str) -> None:
        """Its worker stream is gone (a failed step, the worker lost): DEGRADED without a
        stream, or, while closing, stop waiting for the flush."""
        self._leave("lose its stream", A, D, C)
        if self._sid is None:
            raise InvalidDiarizerTransition(self.id, self._state, "lose a stream it does not have")
        self._sid = None
        if self._state is C:
            self._close_finished()
        else:
            self._enter(D, reason, cause)

    def give_up(self, reason: str) -> None:
        """The diarizer is unavailable for good: UNAVAILABLE, or, while closing, stop waiting."""
        self._leave("give up", U, R, A, D, C)
        if self._state is C:
            self._sid = None
            self._close_finished()
            return
        self._end(U, reason, tell_worker=True)

    def shut(self, tell_worker: bool = True) -> None:
        """CLOSED: free the worker's state for this stream (unless `tell_worker` is False: the
        worker is going away) and end every open turn."""
        self._leave("shut", U, R, A, D, C)
        self._close_finished()
        self._end(DiarizerState.CLOSED, None, tell_worker=tell_worker)

    # --- the worker's replies, routed by the engine ---
    def on_frames(self, seq: int, first: int, probs: np.ndarray | None, now: float) -> tuple[int, int]:
        """FRAMES for this session's AUDIO `seq`: place them, lift a degradation that is over,
        send more. Returns (frames placed, samples of the unit answered)."""
        samples = self.feed.answered(seq)
        n = self._place(first, probs)
        if self._state is D:
            oldest = self.feed.oldest_unanswered
            late = oldest is not None and now - oldest > self._timeout_s
            if (self.cause is DegradedCause.TIMEOUT and not late) or (
                    self.cause is not DegradedCause.TIMEOUT and n):
                self._enter(A, None)
        self._wake()
        if self._state is not C:
            self._pump()
        return n, samples

    def on_closed(self, first: int, probs: np.ndarray | None) -> None:
        """CLOSED: the flush's last frames; the stream is gone."""
        self._leave("take a stream's last frames", C)
        self._sid = None
        self._place(first, probs)
        self._close_finished()

    def oldest_pending(self) -> float | None:
        """When the oldest message still unanswered by the worker was sent."""
        times = [t for t in (self.feed.oldest_unanswered, self._close_sent) if t is not None]
        return min(times) if times else None

    # --- internals ---
    def _wake(self) -> None:
        """Wake `wait_covered`: the timeline or the state changed."""
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def _leave(self, transition: str, *allowed: DiarizerState) -> None:
        if self._state not in allowed:
            raise InvalidDiarizerTransition(self.id, self._state, transition)

    def _enter(self, state: DiarizerState, reason: str | None,
               cause: DegradedCause | None = None) -> None:
        self.cause = cause if state is D else None
        if (state, reason) != (self._state, self.reason):
            self._state, self.reason = state, reason
            self.history.append((state, reason))
            self._wake()

    def _end(self, state: DiarizerState, reason: str | None, tell_worker: bool) -> None:
        if self._sid is not None:
            if tell_worker and self._close_sent is None:
                self._worker.send(Kind.CLOSE, {"sid": self._sid})  # the worker frees the state
            self._sid = None
        self.feed.stop()
        self.timeline.finish()
        self._enter(state, reason)

    def _close_finished(self) -> None:
        if self._close_done is not None and not self._close_done.done():
            self._close_done.set_result(None)

    def _pump(self, flush: bool = False) -> None:
        """Send this session's units while it has credit (all of them when `flush`)."""
        if self._sid is None or not self._worker.ready:
            return
        now = time.monotonic()
        while flush or self.feed.in_flight < self._max_inflight:
            unit = self.feed.take_unit(flush=flush, sent_at=now)
            if unit is None:
                return
            self._worker.send(Kind.AUDIO, {"sid": self._sid, "seq": self.feed.last_seq}, unit)

    def _place(self, first: int, probs: np.ndarray | None) -> int:
        if probs is None or not len(probs):
            return 0
        tl = self.timeline
        for frame, part in self.feed.place(first, probs):
            cut = overlap(frame, tl.frames_end)  # never before what is placed (a new stream)
            if cut < len(part):
                tl.add(frame + cut, part[cut:])
        return len(probs)


__all__ = ["DegradedCause", "DiarizerSession", "DiarizerState", "Host", "InvalidDiarizerTransition",
           "WorkerLink"]
