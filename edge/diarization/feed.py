"""One session's audio on its way to the worker: the bounded backlog and the clock mapping.

Sans-I/O: the engine pushes audio blocks in, takes fixed-size units out to send to the worker
(as the worker's credit allows) and maps the frames that come back onto the session clock.

Why a mapping at all: a diarizer stream sees one gap-free sequence of samples, but the session's
audio is not always sent gap-free — the catch-up policy skips audio, and a new stream (after a
worker restart or a failed step) starts wherever the session is by then. Every unit sent is
recorded on the stream's `OffsetMap` (edge/clock.py, the same map a Google call uses); units are
whole 80 ms frames and streams start on frame boundaries, so each output frame maps to exactly
one session frame.

Catch-up policy (the backlog bound): audio waits here until the worker has credit for it. When
more than `max_backlog_s` waits (the worker is slower than real time, or restarting), the feed
skips to the newest audio: it keeps only the newest `keep_s` (rounded to whole frames) and
records the skipped span, which stays unlabelled on the timeline. Nothing here grows without
bound: the backlog is at most `max_backlog_s` plus one block; `skipped` keeps the last 32 spans.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from edge.clock import FRAME_SAMPLES, SAMPLE_RATE, OffsetMap, frame_ceil, overlap


class SessionFeed:
    """The backlog and stream mapping of one session (see the module docstring).

    `unit_frames`: frames per unit sent. `max_backlog_s`: the catch-up bound. `keep_s`: how
    much of the newest audio a skip keeps.
    """

    def __init__(self, *, unit_frames: int = 4, max_backlog_s: float = 8.0, keep_s: float = 2.0) -> None:
        self.unit = unit_frames * FRAME_SAMPLES
        self.max_backlog = max(self.unit, int(max_backlog_s * SAMPLE_RATE))
        self.keep = min(max(self.unit, frame_ceil(int(keep_s * SAMPLE_RATE))), self.max_backlog)
        self.active = False  # a stream takes this session's audio; otherwise audio is dropped
        self._backlog: deque[np.ndarray] = deque()  # the pending audio, in arrival order
        self._pending = 0
        self._pend_start = 0  # session sample of the first pending sample
        self._expected: int | None = None  # session sample after the last pushed one
        self._map = OffsetMap()  # the current stream's offsets -> session samples
        self.skipped: deque[tuple[float, float]] = deque(maxlen=32)
        self.skipped_frames = 0

    # --- the session side ---
    @property
    def pending_samples(self) -> int:
        return self._pending

    def push(self, start: int, samples: np.ndarray) -> int:
        """Queue float32 `samples` at session sample `start`. Returns frames skipped (catch-up).

        Audio overlapping what was already pushed is trimmed; a gap is filled with silence
        (or, if longer than the backlog bound, starts the backlog afresh after it). While the
        feed is not `active` the audio is dropped (the session has no stream).
        """
        cut = overlap(start, self._expected)
        samples, start = samples[cut:], start + cut
        if len(samples) == 0:
            return 0
        self._expected = start + len(samples)
        if not self.active:
            return 0
        if self._pending == 0:
            cut = frame_ceil(start) - start  # a stream's audio starts on a frame boundary
            samples, start = samples[cut:], start + cut
            self._pend_start = start
        elif start > self._pend_start + self._pending:
            gap = start - (self._pend_start + self._pending)
            if gap > self.max_backlog:
                skipped = self._drop_front(self._pending)
                self._backlog.clear()
                cut = frame_ceil(start) - start
                samples, start = samples[cut:], start + cut
                self._pend_start = start
                self._append(samples)
                return skipped
            self._append(np.zeros(gap, dtype=np.float32))
        self._append(samples)
        if self._pending > self.max_backlog:
            keep_from = frame_ceil(self._pend_start + self._pending - self.keep)
            return self._drop_front(keep_from - self._pend_start)
        return 0

    @property
    def next_frame(self) -> int:
        """The session frame where a stream started now would begin (at the earliest)."""
        first = self._pend_start if self._pending else (self._expected or 0)
        return frame_ceil(first) // FRAME_SAMPLES

    def is_skipped(self, t: float) -> bool:
        """Whether session time `t` lies in a span the catch-up policy skipped."""
        return any(a <= t < b for a, b in self.skipped)

    # --- the worker side ---
    def start_stream(self) -> None:
        """A new worker stream takes this session's audio from the next pending sample on."""
        self.active = True
        self._map = OffsetMap()
        if self._pending:
            self._drop_front(frame_ceil(self._pend_start) - self._pend_start, record=False)

    def stop(self) -> None:
        """No stream any more (refused, worker gone): drop the backlog, take no more audio."""
        self.active = False
        self._backlog.clear()
        self._pending = 0
        self._map = OffsetMap()

    def take_unit(self, flush: bool = False) -> np.ndarray | None:
        """The next unit to send, or None if less than a unit waits (with `flush`, at the end of
        the session's audio, whatever remains)."""
        n = self.unit if self._pending >= self.unit else (self._pending if flush else 0)
        if n == 0:
            return None
        out = np.empty(n, dtype=np.float32)
        filled = 0
        while filled < n:
            part = self._backlog[0]
            take = min(len(part), n - filled)
            out[filled:filled + take] = part[:take]
            filled += take
            if take == len(part):
                self._backlog.popleft()
            else:
                self._backlog[0] = part[take:]
        self._map.add(self._pend_start, n)
        self._pend_start += n
        self._pending -= n
        return out

    def place(self, first: int, probs: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """Map stream frames `first...` onto session frames: `[(session_frame, probs), ...]`.

        Split wherever the stream's audio was not contiguous on the session clock. Returns []
        when nothing was sent on the stream. The map then forgets the pieces before these frames.
        """
        if not self._map.pieces:  # frames beyond anything sent (cannot happen): drop them
            return []
        out: list[tuple[int, np.ndarray]] = []
        i, n = 0, len(probs)
        while i < n:
            session, left = self._map.locate((first + i) * FRAME_SAMPLES)
            # Stop at this piece's end (a frame straddling it stays with it); the next piece
            # may be elsewhere on the session clock.
            count = n - i if left is None else min(n - i, -(-left // FRAME_SAMPLES))
            frame = session // FRAME_SAMPLES
            if out and out[-1][0] + len(out[-1][1]) == frame:  # contiguous: one piece
                out[-1] = (out[-1][0], probs[i - len(out[-1][1]):i + count])
            else:
                out.append((frame, probs[i:i + count]))
            i += count
        self._map.forget_before((first + n) * FRAME_SAMPLES)
        return out

    # --- internals ---
    def _append(self, samples: np.ndarray) -> None:
        if len(samples):
            self._backlog.append(samples)
            self._pending += len(samples)

    def _drop_front(self, n: int, record: bool = True) -> int:
        n = min(n, self._pending)
        if n <= 0:
            return 0
        start = self._pend_start
        left = n
        while left:
            part = self._backlog[0]
            if len(part) <= left:
                left -= len(part)
                self._backlog.popleft()
            else:
                self._backlog[0] = part[left:]
                left = 0
        self._pending -= n
        self._pend_start += n
        frames = n // FRAME_SAMPLES
        if record:
            self.skipped.append((start / SAMPLE_RATE, self._pend_start / SAMPLE_RATE))
            self.skipped_frames += frames
        return frames


__all__ = ["SessionFeed"]
