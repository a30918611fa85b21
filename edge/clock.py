"""The session clock: its units, the audio placed on it, and the map from a receiver's offsets.

One clock per session: samples (16 kHz) since the session's first sample, or seconds on it.
Everything in the daemon that speaks of time speaks of this clock, and every constant of it is
defined here once: the sample rate, the bytes of one PCM sample, the Sortformer frame (80 ms =
1280 samples), the number of Sortformer output slots, and the probability at which a slot is
active in a frame.

Audio goes to *receivers* that number their own time from 0: a Google call (its result
offsets) and a diarizer stream in the worker (its frame index). A receiver counts only the
audio it was sent, contiguously, and starts again from 0 when it is replaced (a rotation, a
reconnect, a worker restart), while the session may have sent it pieces with session time
skipped between them (a gap in the device's audio, audio dropped by a bound). `OffsetMap` is
the one record of where each piece sent sits on the session clock and maps a receiver's
offsets back onto it; `overlap()` is the one rule for audio that arrives again.

Pure: standard library only (no numpy, no I/O), importable by the daemon and by the worker.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from typing import Final

SAMPLE_RATE: Final = 16000  # samples per second of the session clock
PCM_SAMPLE_BYTES: Final = 2  # an `AudioBlock`'s PCM is s16le mono: 2 bytes per sample
FRAME_SAMPLES: Final = 1280  # one Sortformer output frame: 8 feature frames of 10 ms
FRAME_S: Final = FRAME_SAMPLES / SAMPLE_RATE  # 0.08 s
SLOTS: Final = 4  # Sortformer's output columns (a slot is not a speaker: see the timeline)
# A slot is active in a frame when its probability is at or above this (>=, everywhere).
ACTIVE_THRESHOLD: Final = 0.5
# Blocks shorter than this (20 ms) are joined to their neighbour where blocks are held (the
# replay buffer), so that a count of held blocks bounds the audio they hold however small the
# client's messages are.
MIN_BLOCK_S: Final = 0.02
MIN_BLOCK_SAMPLES: Final = round(SAMPLE_RATE * MIN_BLOCK_S)


def to_samples(seconds: float) -> int:
    """The session sample nearest to `seconds` (ties round to even, as `round` does)."""
    return round(seconds * SAMPLE_RATE)


def frame_ceil(sample: int) -> int:
    """The first frame boundary (a multiple of `FRAME_SAMPLES`) at or after `sample`."""
    return -(-sample // FRAME_SAMPLES) * FRAME_SAMPLES


def overlap(start: int, end: int | None) -> int:
    """How many leading samples of audio that starts at session sample `start` were had already,
    when audio up to (not including) `end` was taken (`end` None: nothing was taken yet). The
    same rule holds in frames (the timeline never takes a frame twice).

    The clock never goes backwards: a taker cuts these samples off and keeps the rest (which may
    be empty). A piece starting after `end` leaves a gap, which each taker handles its own way.
    """
    return 0 if end is None else max(0, end - start)


@dataclass(frozen=True)
class AudioBlock:
    """Audio on the session clock: `pcm` is 16 kHz mono s16le starting at sample `start`."""

    start: int
    pcm: bytes

    @property
    def samples(self) -> int:
        return len(self.pcm) // PCM_SAMPLE_BYTES

    @property
    def end(self) -> int:
        return self.start + self.samples

    @property
    def start_s(self) -> float:
        return self.start / SAMPLE_RATE

    @property
    def end_s(self) -> float:
        return self.end / SAMPLE_RATE

    def since(self, sample: int) -> AudioBlock:
        """The part of this block at or after session sample `sample` (all of it when it starts
        later; empty, at `sample`, when it ends before)."""
        cut = min(overlap(self.start, sample), self.samples)
        if cut == 0:
            return self
        return AudioBlock(self.start + cut, self.pcm[cut * PCM_SAMPLE_BYTES:])

    def until(self, sample: int) -> AudioBlock:
        """The part of this block before session sample `sample` (possibly empty)."""
        keep = max(0, min(sample - self.start, self.samples))
        return AudioBlock(self.start, self.pcm[:keep * PCM_SAMPLE_BYTES])


class OffsetMap:
    """Where a receiver's offsets sit on the session clock (one per Google call or diarizer
    stream; see the module docstring).

    The map is piecewise: one (offset, session sample) anchor per contiguous piece sent, an
    offset being the receiver's own sample count. Pieces are recorded in the order sent with
    `add()`; `locate()` and `to_session()` map an offset back. The last piece extends past what
    was sent (a receiver may report a little beyond it: padding at its end). Memory: one anchor
    per discontinuity; `forget_before()` drops the anchors a receiver will not mention again.
    """

    def __init__(self) -> None:
        self._offsets: list[int] = []  # receiver sample where each piece starts (increasing)
        self._starts: list[int] = []  # session sample where each piece starts
        self.sent = 0  # samples sent to the receiver: the offset of the next one
        self.session_end: int | None = None  # session sample just past the last one sent

    @property
    def audio_s(self) -> float:
        """Seconds of audio sent to the receiver."""
        return self.sent / SAMPLE_RATE

    @property
    def pieces(self) -> int:
        """How many anchors are held (contiguous pieces not yet forgotten)."""
        return len(self._offsets)

    def add(self, start: int, samples: int) -> None:
        """Record `samples` samples from session sample `start` as sent next. Raises ValueError
        for a negative count, or a piece that starts before the last one ended (the caller
        trims overlap first, with `overlap()`)."""
        if samples < 0:
            raise ValueError(f"samples must be >= 0, got {samples}")
        if self.session_end is not None and start < self.session_end:
            raise ValueError(f"piece at session sample {start} overlaps what was sent "
                             f"(up to {self.session_end})")
        if samples == 0:
            return
        if start != self.session_end:
            self._offsets.append(self.sent)
            self._starts.append(start)
        self.sent += samples
        self.session_end = start + samples

    def locate(self, offset: int, *, end: bool = False) -> tuple[int, int | None]:
        """The session sample of receiver sample `offset`, and how many offsets remain until the
        next piece begins (None in the last piece, which extends without bound).

        `end`: the offset ends something (a word's end), so one that falls exactly on a piece
        boundary belongs to the piece before it. Before any piece is added the map is the
        identity (a receiver that was sent nothing yet reports offset 0 at session sample 0).
        Offsets before the first piece held extrapolate it backwards.
        """
        if not self._offsets:
            return offset, None
        i = (bisect_left(self._offsets, offset) if end else bisect_right(self._offsets, offset)) - 1
        i = max(i, 0)
        left = self._offsets[i + 1] - offset if i + 1 < len(self._offsets) else None
        return self._starts[i] + offset - self._offsets[i], left

    def to_session(self, offset: int, *, end: bool = False) -> int:
        """The session sample of receiver sample `offset` (see `locate()`)."""
        return self.locate(offset, end=end)[0]

    def forget_before(self, offset: int) -> None:
        """Drop the anchors of pieces that end at or before receiver sample `offset`; the piece
        holding `offset` (and the last piece) stay. Call it once the receiver's reports have
        passed `offset` for good."""
        drop = bisect_right(self._offsets, offset) - 1
        if drop > 0:
            del self._offsets[:drop], self._starts[:drop]


__all__ = [
    "ACTIVE_THRESHOLD",
    "FRAME_S",
    "FRAME_SAMPLES",
    "MIN_BLOCK_S",
    "MIN_BLOCK_SAMPLES",
    "PCM_SAMPLE_BYTES",
    "SAMPLE_RATE",
    "SLOTS",
    "AudioBlock",
    "OffsetMap",
    "frame_ceil",
    "overlap",
    "to_samples",
]
