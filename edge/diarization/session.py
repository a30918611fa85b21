"""`DiarizerSession`: what one client session holds of the local diarizer.

The session code uses only the public part: `state`, `reason`, `timeline`, `push()`,
`wait_covered()`, `close()`. The engine (edge/diarization/engine.py) drives the rest.

States:
- "active": admitted; frames flow into `timeline` (labels may lag by the model's latency).
- "refused": the worker is full (memory budget, or as many sessions as it can step in real
  time). Admitted automatically, in order of opening, as soon as another session frees a slot
  (its audio before then stays unlabelled).
- "degraded": admitted, but labels are null for now — a step exceeded the timeout, a step
  failed, or the worker is restarting. `reason` says which. Returns to "active" by itself when
  labels flow again; after a new stream starts, its speakers get new numbers.
- "unavailable": the engine cannot label now: loading or restarting ("diarizer loading",
  "diarizer restarting": admitted once the worker is ready), or for good (disabled, NeMo
  missing, model missing or broken, worker unable to start); see `reason`.
- "closed": after `close()`.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import numpy as np

from edge.clock import SAMPLE_RATE, AudioBlock
from edge.diarization.feed import SessionFeed
from edge.diarization.timeline import SpeakerTimeline

if TYPE_CHECKING:
    from edge.diarization.engine import DiarizationEngine


class DiarizerSession:
    """One session's view of the diarizer (see the module docstring for `state`)."""

    def __init__(self, engine: DiarizationEngine, session_id: str, feed: SessionFeed) -> None:
        self.id = session_id
        self.state = "unavailable"
        self.reason: str | None = None
        self.timeline = SpeakerTimeline()
        self.history: deque[tuple[str, str | None]] = deque(maxlen=16)  # diagnostics, tests
        # --- engine-side bookkeeping ---
        self.feed = feed
        self.admitted = False  # holds a slot in the worker's budget
        self.sid: str | None = None  # the live worker stream, if any
        self.cause: str | None = None  # why degraded: "timeout" | "error" | "restart"
        self.inflight: deque[tuple[int, float, int]] = deque()  # (seq, sent at, samples)
        self.closing = False
        self.close_sent: float | None = None
        self.close_done: asyncio.Future[None] | None = None
        self.skip_noticed = False
        self._engine = engine
        self._seq = 0
        self._changed: asyncio.Event | None = None
        self._closer: asyncio.Task[None] | None = None

    def push(self, block: AudioBlock) -> None:
        """Hand audio to the diarizer; returns at once, never raises for a live session.

        Bounded: audio waits in this session's backlog while the worker has no credit for it;
        beyond `EDGE_DIARIZATION_MAX_BACKLOG_S` the oldest is skipped and the newest kept
        (catch-up, see edge/diarization/feed.py). Audio is dropped unless the session is
        admitted (active or degraded), and after `close()`.
        """
        if self.closing or self.state == "closed":
            return
        samples = np.frombuffer(block.pcm, dtype="<i2").astype(np.float32) * (1.0 / 32768.0)
        skipped = self.feed.push(block.start, samples)
        if skipped:
            self._engine._skipped(self, skipped)
        self._engine._pump(self)

    async def wait_covered(self, t: float, timeout: float) -> bool:
        """Wait until the timeline covers session time `t` (seconds), at most `timeout` s.

        Returns True once it does (then ask `timeline.speaker_for`). Returns False at the
        timeout, or at once when it cannot happen soon: the session is not "active", or `t`
        lies in audio the catch-up policy skipped.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if self.timeline.covered_until >= t:
                return True
            remaining = deadline - loop.time()
            if self.state != "active" or self.feed.is_skipped(t) or remaining <= 0:
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
            self._closer = asyncio.create_task(self._engine._close_session(self))
        await asyncio.shield(self._closer)

    # --- for the engine ---
    def set_state(self, state: str, reason: str | None = None, cause: str | None = None) -> None:
        self.cause = cause if state == "degraded" else None
        if (state, reason) != (self.state, self.reason):
            self.state, self.reason = state, reason
            self.history.append((state, reason))
            self.wake()

    def wake(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def oldest_pending(self) -> float | None:
        """When the oldest message still unanswered by the worker was sent."""
        times = [self.inflight[0][1]] if self.inflight else []
        if self.close_sent is not None:
            times.append(self.close_sent)
        return min(times) if times else None

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "state": self.state, "reason": self.reason,
                "covered_until": round(self.timeline.covered_until, 3),
                "backlog_s": self.feed.pending_samples / SAMPLE_RATE, "at": time.monotonic()}


__all__ = ["DiarizerSession"]
