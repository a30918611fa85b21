"""End of speech as Deepgram defines it, decided from timings on the session clock (sans I/O).

Deepgram's two signals (its docs: endpointing, utterance end):
- `speech_final=true` on the final that closes speech followed by at least `endpointing` ms
  without speech; every other final has `speech_final=false`.
- one `UtteranceEnd` per gap of at least `utterance_end_ms` after the last finalized word,
  with `last_word_end` = that word's end, never twice for the same word.

`EndOfSpeech` learns three things and answers in order:
- `speech(start, end)`: speech is known in `[start, end)` (words of any result, interim or
  final; the upstream's speech-begin events; the local diarizer's voice activity);
- `heard(t)`: the voice detector has reported everything before `t` (result end offsets and
  event offsets of the upstream; the diarizer's `covered_until`; the end of the audio);
- `final(item, last_word_end)`: a final, held until its `speech_final` is decidable.

`ready()` returns what may go out now, in session-clock order: finals with their
`speech_final`, and `UtteranceEnd`s placed before the first final that comes after their gap.
A final is decidable as soon as speech shows up within `endpointing` after its last word
(false) or the detector has heard `endpointing` past it with none (true); `flush()` decides
the held ones at once (Finalize, end of audio) with what is known.

Memory: speech spans are kept only after the last finalized word (older ones can no longer
matter), at most `MAX_SPANS` (adjacent ones are merged beyond that).
"""

from __future__ import annotations

from bisect import insort
from collections import deque
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")
MAX_SPANS = 1024


@dataclass(frozen=True)
class Final(Generic[T]):
    """A decided final: the caller's `item` and its `speech_final`."""

    item: T
    speech_final: bool


@dataclass(frozen=True)
class UtteranceEnd:
    last_word_end: float


class EndOfSpeech(Generic[T]):
    """One channel's end-of-speech decisions (see the module docstring).

    `endpointing_s`: None turns `speech_final` off (always false). `utterance_end_s`: None
    turns UtteranceEnd off.
    """

    def __init__(self, endpointing_s: float | None, utterance_end_s: float | None) -> None:
        self.endpointing_s = endpointing_s
        self.utterance_end_s = utterance_end_s
        # (item, first word start, last word end) of finals not yet decided
        self._held: deque[tuple[T, float | None, float | None]] = deque()
        self._spans: list[tuple[float, float]] = []  # speech after the last finalized word
        self._heard = 0.0
        self._last_word_end: float | None = None  # of the finals released so far
        self._ended_for: float | None = None  # the word end an UtteranceEnd was sent for

    @property
    def heard_until(self) -> float:
        return self._heard

    def speech(self, start: float, end: float) -> None:
        """Speech is known in `[start, end)` seconds (end may equal start: an onset)."""
        end = max(end, start)
        floor = self._last_word_end
        if floor is not None and end <= floor:
            return
        if self._spans and self._spans[-1][0] <= start <= self._spans[-1][1]:
            # The common case, speech growing at the end: extend the newest span.
            self._spans[-1] = (self._spans[-1][0], max(self._spans[-1][1], end))
        else:
            insort(self._spans, (start, end))
        if len(self._spans) > MAX_SPANS:  # bounded: merge the two oldest
            (a, b), (_, d) = self._spans[0], self._spans[1]
            self._spans[:2] = [(a, max(b, d))]
        self._heard = max(self._heard, end)

    def heard(self, t: float) -> None:
        """The voice detector has reported everything before `t` seconds."""
        self._heard = max(self._heard, t)

    def final(self, item: T, words: tuple[float, float] | None) -> None:
        """Hold a final for its decision; `words` is (first word start, last word end), None
        when it has no words (then never speech-final, and no word of it ends an utterance)."""
        start, end = words if words is not None else (None, None)
        self._held.append((item, start, end))

    def ready(self) -> list[Final[T] | UtteranceEnd]:
        """What may go out now, in order."""
        out: list[Final[T] | UtteranceEnd] = []
        while self._held:
            item, start, end = self._held[0]
            self._ue_before(start if start is not None else self._heard, out)
            decided = self._decide(end, final=False)
            if decided is None:
                break
            self._held.popleft()
            self._release(item, end, decided, out)
        if not self._held:
            self._ue_before(None, out)
        return out

    def flush(self) -> list[Final[T] | UtteranceEnd]:
        """Decide every held final now (Finalize, end of audio), with what is known."""
        out = self.ready()
        while self._held:
            item, start, end = self._held.popleft()
            self._ue_before(start if start is not None else self._heard, out)
            self._release(item, end, bool(self._decide(end, final=True)), out)
        self._ue_before(None, out)
        return out

    # --- decisions ---
    def _decide(self, end: float | None, *, final: bool) -> bool | None:
        """speech_final for a final whose last word ends at `end`, or None (not yet known)."""
        if self.endpointing_s is None or end is None:
            return False
        horizon = end + self.endpointing_s
        for start, stop in self._spans:
            if stop > end + 1e-6 and start < horizon:
                return False  # speech resumed (or never stopped) within `endpointing`
        if self._heard >= horizon - 1e-6:
            return True
        return False if final else None

    def _release(self, item: T, end: float | None, speech_final: bool,
                 out: list[Final[T] | UtteranceEnd]) -> None:
        out.append(Final(item, speech_final))
        if end is not None and (self._last_word_end is None or end > self._last_word_end):
            self._last_word_end = end
            self._spans = [(a, b) for a, b in self._spans if b > end]

    def _ue_before(self, limit: float | None, out: list[Final[T] | UtteranceEnd]) -> None:
        """An UtteranceEnd for the last finalized word, if a gap of `utterance_end_s` after it
        (or after speech that followed it unfinalized) is known and, with a `limit` (the held
        final's first word), lies wholly before it: the UtteranceEnd then precedes that final;
        a gap after the held final's words waits for it to go out first."""
        e = self._last_word_end
        if self.utterance_end_s is None or e is None or self._ended_for == e:
            return
        point = e
        for start, stop in self._spans:
            if stop <= point:
                continue
            if start - point >= self.utterance_end_s - 1e-6:
                break
            point = max(point, stop)
        else:
            if self._heard - point < self.utterance_end_s - 1e-6:
                return
        if limit is not None and point + self.utterance_end_s > limit + 1e-6:
            return
        self._ended_for = e
        out.append(UtteranceEnd(e))


class VoiceRuns:
    """Diarization-only: the local diarizer's voiced frames -> runs of speech.

    A run opens at its first voiced frame and closes once `gap_s` passes without one (shorter
    pauses stay inside it). `feed(first_frame, voiced)` takes consecutive frames and returns
    what happened, in order: ("started", t, t) and ("run", start, end) (a closed run); every
    voiced frame is also speech for `eos`. `close()` ends the open run now (Finalize, end).
    """

    def __init__(self, frame_s: float, gap_s: float) -> None:
        self.frame_s, self.gap_s = frame_s, gap_s
        self.next_frame = 0
        self._run: tuple[float, float] | None = None

    def feed(self, first_frame: int, voiced: list[bool], eos: EndOfSpeech[Any]
             ) -> list[tuple[str, float, float]]:
        out: list[tuple[str, float, float]] = []
        for i, on in enumerate(voiced):
            t = (first_frame + i) * self.frame_s
            if on:
                if self._run is None:
                    self._run = (t, t + self.frame_s)
                    out.append(("started", t, t))
                else:
                    self._run = (self._run[0], t + self.frame_s)
                eos.speech(t, t + self.frame_s)
            elif self._run is not None and t + self.frame_s - self._run[1] >= self.gap_s - 1e-9:
                out.append(("run", *self._run))
                self._run = None
        self.next_frame = first_frame + len(voiced)
        return out

    def close(self) -> tuple[float, float] | None:
        run, self._run = self._run, None
        return run


__all__ = ["MAX_SPANS", "EndOfSpeech", "Final", "UtteranceEnd", "VoiceRuns"]
