"""The speaker timeline: Sortformer frames on the session clock, and the labels read from it.

Pure and sans-I/O: the engine adds frames as the worker returns them, the session asks
`speaker_for(word.start, word.end)` and pops `SpeakerTurn`s. Everything is on one clock,
seconds since the session's first sample; frame `f` covers `[f * FRAME_S, (f + 1) * FRAME_S)`
(edge/clock.py: 0.08 s).

- Speaker numbers are 0-based in order of arrival: the first of Sortformer's output slots to
  be active for `min_turn_s` in this session is speaker 0, the next new one 1, and so on; a
  number, once given, is never changed. The trained model orders its slots by arrival, but
  nothing forces it to (a false start of slot 2, random test weights), so the protocol's
  promise is kept here rather than assumed. A new stream for the session (after the worker
  restarted, or a step failed) knows nothing of earlier voices, so `new_stream()` closes open
  turns and its speakers get new numbers after the session's last: a number never comes to
  name another person, though a returning voice may get a second number.
- Unlabelled spans (audio the diarizer skipped or never saw: before admission, while the
  worker restarted, when it fell behind real time) are frames of NaN: covered, but nobody
  speaks in them, so `speaker_for` answers `None` there.
- Memory is bounded: only the newest `horizon_s` seconds of frames are kept (default 600 s =
  7500 frames x 4 float32 = 120 KB, and 30 KB saying which stream made each frame); a query
  that reaches further back sees nothing there.
  Finished turns wait in a bounded list (`max_pending_turns`); if nobody pops them, the oldest
  are dropped (counted in `turns_dropped`).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from edge.clock import ACTIVE_THRESHOLD, FRAME_S, SLOTS


@dataclass(frozen=True)
class SpeakerTurn:
    """A span in which one speaker is active. `is_final=False` is a turn still growing."""

    speaker: int
    start: float
    end: float
    is_final: bool


class SpeakerTimeline:
    """Frame probabilities placed by frame index on the session clock.

    `threshold`: a slot is active in a frame (and a span's winner counts) at or above it
    (default: the clock's `ACTIVE_THRESHOLD`).
    `horizon_s`: how much history is kept. `gap_s`: a silence shorter than this does not end
    a turn. `min_turn_s`: shorter turns are never reported.
    """

    def __init__(
        self,
        *,
        threshold: float = ACTIVE_THRESHOLD,
        horizon_s: float = 600.0,
        gap_s: float = 0.32,
        min_turn_s: float = 0.16,
        max_pending_turns: int = 256,
    ) -> None:
        if horizon_s < FRAME_S:
            raise ValueError(f"horizon_s must be >= {FRAME_S}")
        self.threshold = threshold
        self._cap = math.ceil(horizon_s / FRAME_S)
        self._buf = np.full((self._cap, SLOTS), np.nan, dtype=np.float32)
        self._end = 0  # frames [0, _end) have been placed (labelled or NaN)
        self._gap_frames = max(0, round(gap_s / FRAME_S))
        self._min_frames = max(1, round(min_turn_s / FRAME_S))
        self._open: list[int | None] = [None] * SLOTS  # first frame of each open turn
        self._last: list[int] = [0] * SLOTS  # last active frame of each open turn
        self._reported: list[int] = [0] * SLOTS  # end of the open turn last popped
        self._pending: deque[SpeakerTurn] = deque(maxlen=max_pending_turns)
        self.turns_dropped = 0
        # Which stream placed each frame, and each stream's slot -> speaker number map: frames
        # keep the numbers of the stream that made them.
        self._stream = np.zeros(self._cap, dtype=np.int32)
        self._streams: dict[int, list[int | None]] = {0: [None] * SLOTS}
        self._current = 0
        self._numbered = 0

    # --- placing frames ---
    @property
    def frames_end(self) -> int:
        """The first frame index not yet placed."""
        return self._end

    @property
    def covered_until(self) -> float:
        """Session seconds up to which frames (labelled or unlabelled) are placed."""
        return self._end * FRAME_S

    def add(self, first_frame: int, probs: np.ndarray) -> None:
        """Place `probs` (n x `SLOTS` slot probabilities) at frames `first_frame...`.

        Frames between `frames_end` and `first_frame` become unlabelled. Raises `ValueError`
        if `first_frame` lies before `frames_end` (frames arrive in order, never twice) or
        `probs` is not n x `SLOTS`.
        """
        probs = np.asarray(probs, dtype=np.float32)
        if probs.ndim != 2 or probs.shape[1] != SLOTS:
            raise ValueError(f"probs must be n x {SLOTS}, got {probs.shape}")
        if first_frame < self._end:
            raise ValueError(f"frame {first_frame} is before the timeline's end {self._end}")
        self.skip_to(first_frame)
        n = len(probs)
        if n > self._cap:  # more than the horizon at once: only the newest part is kept
            self.skip_to(self._end + n - self._cap)
            probs = probs[-self._cap:]
            n = self._cap
        idx = (np.arange(self._end, self._end + n)) % self._cap
        self._buf[idx] = probs
        self._stream[idx] = self._current
        for i in range(n):
            self._turn_step(self._end + i, probs[i])
        self._end += n

    def skip_to(self, frame: int) -> None:
        """Mark `[frames_end, frame)` unlabelled (a no-op when `frame <= frames_end`)."""
        if frame <= self._end:
            return
        span = min(frame - self._end, self._cap)
        idx = np.arange(frame - span, frame) % self._cap
        self._buf[idx] = np.nan
        self.break_turns()
        self._end = frame

    def break_turns(self) -> None:
        """End every open turn now (a gap, or a new stream whose slots mean new people)."""
        for s in range(SLOTS):
            self._close(s)

    def new_stream(self) -> None:
        """Frames from here on come from a new Sortformer stream, whose slots are unrelated to
        the last one's: end open turns and number its speakers afresh, after those given."""
        self.break_turns()
        live = {int(g) for g in np.unique(self._stream[~np.isnan(self._buf[:, 0])])}
        self._streams = {g: m for g, m in self._streams.items() if g in live}  # bounded
        self._current += 1
        self._streams[self._current] = [None] * SLOTS

    @property
    def speakers(self) -> int:
        """How many speaker numbers this session has given (the next one's number)."""
        return self._numbered

    def finish(self) -> None:
        """The session ended: open turns become final (to be popped)."""
        self.break_turns()

    # --- reading labels ---
    def speaker_for(self, start: float, end: float) -> tuple[int | None, float]:
        """The speaker most active over `[start, end)` seconds, and how confident.

        Each speaker's score is its mean probability over the span's labelled frames, weighted
        by how much of each frame the span overlaps. Returns `(speaker, score)` for the best
        score if it reaches `threshold`, `(None, score)` if it does not, and `(None, 0.0)`
        when no labelled frame overlaps the span (unlabelled, not yet covered, or older than
        the horizon). A zero-length span asks about the frame containing `start`.
        """
        f0 = max(0, math.floor(start / FRAME_S))
        f1 = max(f0 + 1, math.ceil(end / FRAME_S))
        lo = max(f0, self._end - self._cap, 0)
        hi = min(f1, self._end)
        if hi <= lo:
            return None, 0.0
        frames = np.arange(lo, hi)
        rows = self._buf[frames % self._cap]
        if end > start:
            weights = np.minimum((frames + 1) * FRAME_S, end) - np.maximum(frames * FRAME_S, start)
            weights = np.clip(weights, 0.0, None)
        else:
            weights = np.ones(len(frames))
        labelled = ~np.isnan(rows[:, 0]) & (weights > 0)
        if not labelled.any():
            return None, 0.0
        w = weights[labelled]
        rows, streams = rows[labelled], self._stream[frames[labelled] % self._cap]
        # Usually one stream; across a new stream, each of its slots counts only its frames.
        best_score, best = -1.0, (self._current, 0)
        for g in np.unique(streams):
            mine = streams == g
            scores = (rows[mine] * w[mine, None]).sum(axis=0) / w.sum()
            slot = int(np.argmax(scores))
            if float(scores[slot]) > best_score:
                best_score, best = float(scores[slot]), (int(g), slot)
        if best_score < self.threshold:
            return None, best_score
        return self._speaker(best[1], best[0]), best_score

    def voiced(self, since: int) -> tuple[int, np.ndarray]:
        """Voice activity, the diarizer as voice detector: for frames `since...frames_end`
        (older than the horizon: gone), whether any speaker is at or above `threshold`.
        Unlabelled frames count as unvoiced. Returns (first frame, bool per frame)."""
        lo = max(since, self._end - self._cap, 0)
        rows = self._buf[np.arange(lo, max(lo, self._end)) % self._cap]
        return lo, np.nan_to_num(rows, nan=0.0).max(axis=1, initial=0.0) >= self.threshold

    def pop_turns(self, include_open: bool = True) -> list[SpeakerTurn]:
        """Turns to report since the last call, in the order they ended.

        Every finished turn once (`is_final=True`); with `include_open`, also each open turn
        that grew since it was last reported (`is_final=False`, same start, later end).
        """
        out = list(self._pending)
        self._pending.clear()
        if include_open:
            for s in range(SLOTS):
                first = self._open[s]
                if first is None:
                    continue
                stop = self._last[s] + 1
                if stop - first >= self._min_frames and stop > self._reported[s]:
                    self._reported[s] = stop
                    out.append(SpeakerTurn(self._speaker(s), first * FRAME_S, stop * FRAME_S,
                                           False))
        return out

    # --- turn extraction, one frame at a time ---
    def _turn_step(self, frame: int, p: np.ndarray) -> None:
        if np.isnan(p[0]):
            self.break_turns()
            return
        for s in range(SLOTS):
            if p[s] >= self.threshold:
                if self._open[s] is None:
                    self._open[s] = frame
                    self._reported[s] = 0
                self._last[s] = frame
                if (self._streams[self._current][s] is None
                        and frame - self._open[s] + 1 >= self._min_frames):
                    self._speaker(s)  # numbered once it really speaks, not on a blip
            elif self._open[s] is not None and frame - self._last[s] > self._gap_frames:
                self._close(s)

    def _close(self, s: int) -> None:
        first = self._open[s]
        if first is None:
            return
        self._open[s] = None
        stop = self._last[s] + 1
        if stop - first >= self._min_frames:
            if len(self._pending) == self._pending.maxlen:
                self.turns_dropped += 1
            self._pending.append(SpeakerTurn(self._speaker(s), first * FRAME_S, stop * FRAME_S,
                                             True))

    def _speaker(self, slot: int, stream: int | None = None) -> int:
        """The session's number for output slot `slot` of `stream` (default: the current one),
        given on its first activity."""
        numbers = self._streams[self._current if stream is None else stream]
        number = numbers[slot]
        if number is None:
            number = numbers[slot] = self._numbered
            self._numbered += 1
        return number
