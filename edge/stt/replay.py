"""Rotation and replay without loss or doubling, sans I/O.

The invariant (see docs/notes/google-speech.md): keep every audio block from the end of the last
final result (`delivered_until`) onward. When a streaming call ends abnormally (our quiet-moment
rotation, a retryable error, Google's duration limit) the next call's first audio is that
retained audio; each call remembers where the audio it was sent sits on the session clock (an
`OffsetMap`, edge/clock.py), every offset it returns is mapped through that, a final word is
delivered only if it ends after `delivered_until`, and `delivered_until` then advances to the
final's end, dropping the audio before it. When a call ends *cleanly* (we half-closed it and
Google answered everything), all the audio it was sent is covered, so `delivered_until` advances
to the end of what it was sent.

Everything here is plain state and arithmetic on sample indices (16 kHz, the session clock):
no sockets, no tasks, no clocks, so it is unit-tested without a server.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from edge.clock import MIN_BLOCK_SAMPLES, PCM_SAMPLE_BYTES, SAMPLE_RATE, AudioBlock, OffsetMap, to_samples
from edge.stt.base import TranscriptEvent, Word

MAX_LOST_SPANS = 256  # bound on remembered dropped spans; beyond it neighbours are merged


# --- what an upstream call says, in call time (seconds since the call's first sample) ---------
@dataclass(frozen=True)
class RawWord:
    word: str
    start: float
    end: float
    confidence: float = 0.0
    speaker_label: str | None = None


@dataclass(frozen=True)
class RawResult:
    """One recognition result as the API gave it; `end` is its result end offset, if given."""

    is_final: bool
    transcript: str
    confidence: float = 0.0
    words: tuple[RawWord, ...] = ()
    end: float | None = None
    language: str | None = None


@dataclass(frozen=True)
class RawSpeechEvent:
    kind: str  # "speech_started" | "speech_ended"
    offset: float | None


# --- the retained audio ---------------------------------------------------------------------
class ReplayBuffer:
    """Audio from `delivered_until` onward, at most `max_s` seconds of it.

    Overflow policy: drop the oldest samples. Dropped samples that are not yet finalized are
    remembered as *at risk*: if the call they were sent on later completes or finalizes past
    them nothing is lost; if a call boundary comes first (`take_lost()`), they are lost.

    Blocks are held coalesced: a push contiguous with a newest block shorter than
    `MIN_BLOCK_SAMPLES` (20 ms) joins it, so the block count is bounded by the retained audio,
    not by how small the client's frames are. Reads find their block by bisection.
    """

    def __init__(self, max_s: float) -> None:
        """`max_s`: the replay bound in seconds (EDGE_STT_REPLAY_S). Raises ValueError if <= 0."""
        if max_s <= 0:
            raise ValueError("max_s must be > 0")
        self.max_samples = round(max_s * SAMPLE_RATE)
        # Retained blocks are `_blocks[_head:]`, with their start samples in `_starts` (for
        # bisection); popping from the front moves `_head`, compacted now and then.
        self._blocks: list[AudioBlock] = []
        self._starts: list[int] = []
        self._head = 0
        self._samples = 0
        self.end = 0  # session sample just past the newest audio pushed
        self.delivered_until = 0  # session sample before which everything is delivered (or given up)
        self._at_risk: deque[list[int]] = deque()  # [start, end) spans dropped before finalizing

    @property
    def retained_s(self) -> float:
        return self._samples / SAMPLE_RATE

    @property
    def blocks(self) -> int:
        """How many blocks are retained (bounded by retained audio / 20 ms, plus gaps)."""
        return len(self._blocks) - self._head

    @property
    def intact(self) -> bool:
        """True while nothing unfinalized has been dropped: a replay from `delivered_until` is whole."""
        return not self._at_risk

    @property
    def start(self) -> int | None:
        """The first retained sample, or None when nothing is retained."""
        return self._starts[self._head] if self.blocks else None

    def push(self, block: AudioBlock) -> None:
        """Append audio. Overlap with audio already pushed is cut off (the clock never goes
        backwards); a gap is kept as a gap (the call's `OffsetMap` maps across it)."""
        block = block.since(self.end)
        if not block.samples:
            return
        last = self._blocks[-1] if self.blocks else None
        if last is not None and last.end == block.start and last.samples < MIN_BLOCK_SAMPLES:
            self._blocks[-1] = AudioBlock(last.start, last.pcm + block.pcm)
        else:
            self._blocks.append(block)
            self._starts.append(block.start)
        self._samples += block.samples
        self.end = block.end
        excess = self._samples - self.max_samples
        while excess > 0:
            oldest = self._blocks[self._head]
            n = min(excess, oldest.samples)
            self._drop_front(n)
            self._note_at_risk(oldest.start, oldest.start + n)
            excess -= n

    def read(self, cursor: int, max_samples: int) -> AudioBlock | None:
        """Up to `max_samples` contiguous retained samples from the first one at/after `cursor`.

        Returns None when nothing is retained at/after `cursor`. Consecutive blocks are joined
        (so a request carries ~100 ms whatever the block size); a gap ends the piece.
        """
        parts: list[bytes] = []
        start = pos = -1
        taken = 0
        for block in self._iter_from(cursor):
            if parts and block.start != pos:
                break
            a = max(cursor, block.start) if not parts else block.start
            n = min(block.end - a, max_samples - taken)
            off = (a - block.start) * PCM_SAMPLE_BYTES
            parts.append(block.pcm[off:off + n * PCM_SAMPLE_BYTES])
            if start < 0:
                start = a
            pos, taken = a + n, taken + n
            if taken >= max_samples or pos < block.end:
                break
        return AudioBlock(start, b"".join(parts)) if parts else None

    def finalize(self, until: int) -> None:
        """Everything before session sample `until` is delivered: advance `delivered_until`, drop it."""
        if until <= self.delivered_until:
            return
        self.delivered_until = until
        while self.blocks and (first := self._blocks[self._head]).start < until:
            self._drop_front(min(first.samples, until - first.start))
        while self._at_risk and self._at_risk[0][1] <= until:
            self._at_risk.popleft()
        if self._at_risk and self._at_risk[0][0] < until:
            self._at_risk[0][0] = until

    def take_lost(self) -> int:
        """At a call boundary: the dropped, never-finalized samples are lost for good.

        Returns how many samples; `delivered_until` moves past them so they are counted once.
        """
        lost = sum(b - a for a, b in self._at_risk)
        if self._at_risk:
            self.delivered_until = max(self.delivered_until, self._at_risk[-1][1])
            self._at_risk.clear()
        return lost

    def take_skipped(self, cursor: int, upto: int) -> int:
        """A call skipped from `cursor` to `upto` because that audio was dropped before it was
        ever sent on the call: those samples are lost now. Returns how many."""
        lost = 0
        for span in self._at_risk:
            a, b = max(span[0], cursor), min(span[1], upto)
            if b > a:
                lost += b - a
        if lost:
            # Keep the parts outside [cursor, upto) at risk; the skipped part is accounted for.
            kept: list[list[int]] = []
            for a, b in self._at_risk:
                if a < cursor:
                    kept.append([a, min(b, cursor)])
                if b > upto:
                    kept.append([max(a, upto), b])
            self._at_risk = deque(kept)
        return lost

    def _iter_from(self, cursor: int) -> Iterator[AudioBlock]:
        # The block holding `cursor` (or the first after it), found by bisection, and on.
        i = max(self._head, bisect_right(self._starts, cursor, lo=self._head) - 1)
        while i < len(self._blocks):
            block = self._blocks[i]
            if block.end > cursor:
                yield block
            i += 1

    def _drop_front(self, n: int) -> None:
        oldest = self._blocks[self._head]
        if n < oldest.samples:
            self._blocks[self._head] = oldest.since(oldest.start + n)
            self._starts[self._head] = oldest.start + n
        else:
            self._head += 1
            if self._head > 64 and self._head * 2 > len(self._blocks):
                del self._blocks[:self._head], self._starts[:self._head]
                self._head = 0
        self._samples -= n

    def _note_at_risk(self, a: int, b: int) -> None:
        a = max(a, self.delivered_until)
        if b <= a:
            return
        if self._at_risk and self._at_risk[-1][1] == a:
            self._at_risk[-1][1] = b
        else:
            self._at_risk.append([a, b])
        if len(self._at_risk) > MAX_LOST_SPANS:
            # Keep the bound: merge the two oldest spans (the gap between them then counts as
            # lost too, an overestimate only for sessions with many audio gaps).
            first = self._at_risk.popleft()
            self._at_risk[0][0] = first[0]


# --- turning a call's results into session events -------------------------------------------
_EDGE_PUNCT = re.compile(r"^[^\w']+|[^\w']+$")


def plain_word(text: str) -> str:
    """Deepgram's `word`: lower case, without the punctuation around it."""
    return _EDGE_PUNCT.sub("", text).lower() or text.lower()


class Transcript:
    """Applies results to the session: maps, de-duplicates, advances `delivered_until`."""

    def __init__(self, buffer: ReplayBuffer) -> None:
        self.buffer = buffer
        self._in_speech = False
        self._any = False
        self._started = 0.0
        self._last_event = 0.0

    def on_result(self, raw: RawResult, call: OffsetMap) -> TranscriptEvent | None:
        """The session event for `raw` (None when it adds nothing new). A final advances
        `delivered_until` and drops the retained audio before it."""
        delivered_until = self.buffer.delivered_until
        mapped: list[Word] = []
        seen: set[tuple[int, int, str]] = set()
        last_end = delivered_until
        for w in raw.words:
            start = call.to_session(to_samples(w.start))
            end = call.to_session(to_samples(w.end), end=True)
            key = (start, end, w.word)
            # Already delivered (before delivered_until) or repeated in this result (v1 resends every
            # word of the call with diarization on): skip.
            if end <= delivered_until or key in seen:
                continue
            seen.add(key)
            # A word cannot begin before audio that is already delivered ended.
            start = min(max(start, delivered_until), end)
            mapped.append(Word(
                word=plain_word(w.word), start=start / SAMPLE_RATE, end=end / SAMPLE_RATE,
                confidence=w.confidence, punctuated_word=w.word, speaker_label=w.speaker_label,
            ))
            last_end = max(last_end, end)
        result_end = call.to_session(to_samples(raw.end), end=True) if raw.end is not None else last_end
        result_end = max(result_end, last_end)
        if raw.words and not mapped:
            transcript = ""
        elif len(mapped) == len(raw.words):
            transcript = raw.transcript
        else:
            transcript = " ".join(w.punctuated_word or w.word for w in mapped)
        if raw.is_final:
            fresh = result_end > delivered_until
            self.buffer.finalize(result_end)
            if not transcript.strip() or not fresh:
                return None
        elif not transcript.strip():
            return None
        return TranscriptEvent(
            kind="result", start=delivered_until / SAMPLE_RATE, end=result_end / SAMPLE_RATE,
            is_final=raw.is_final, transcript=transcript,
            confidence=raw.confidence, words=tuple(mapped), language=raw.language or None,
        )

    def on_speech_event(self, raw: RawSpeechEvent, call: OffsetMap) -> list[TranscriptEvent]:
        """Voice activity, mapped. Replayed audio repeats events: one at or before the last
        one delivered is dropped, as is a begin while speech is on (unless the utterance it
        began has been finalized since: the call that would have said "ended" was cut, so
        that is said first, at `delivered_until`). Begin and end alternate."""
        at = call.to_session(to_samples(raw.offset or 0.0)) / SAMPLE_RATE
        delivered_until = self.buffer.delivered_until / SAMPLE_RATE
        out: list[TranscriptEvent] = []
        if at <= self._last_event and self._any:
            return out
        if raw.kind == "speech_started":
            if self._in_speech:
                if self._started >= delivered_until:
                    return out  # the same utterance, heard again after a replay
                out.append(self._event("speech_ended", max(delivered_until, self._last_event)))
            out.append(self._event("speech_started", at))
            self._started = at
        elif self._in_speech:
            out.append(self._event("speech_ended", at))
        return out

    def _event(self, kind: str, at: float) -> TranscriptEvent:
        self._in_speech = kind == "speech_started"
        self._last_event, self._any = at, True
        return TranscriptEvent(kind=kind, start=at, end=at)  # type: ignore[arg-type]


__all__ = [
    "RawResult",
    "RawSpeechEvent",
    "RawWord",
    "ReplayBuffer",
    "Transcript",
    "plain_word",
]
