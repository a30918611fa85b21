"""The rotation/replay core without I/O: buffer, call clock, result mapping, policies.

The property test drives the fake service's own recogniser (sans-I/O) through calls cut at
arbitrary points and closed at quiet points, the way the stream runner does, and checks the
invariant: every word delivered once, in order, at its exact place on the session clock.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.clock import MIN_BLOCK_SAMPLES, SAMPLE_RATE, AudioBlock, OffsetMap
from edge.stt.policy import Backoff, RotationPolicy
from edge.stt.replay import (
    RawResult,
    RawSpeechEvent,
    RawWord,
    ReplayBuffer,
    Transcript,
    plain_word,
)
from tests.fakes.google_speech import Out, Recognizer, encode, utterances


def blocks(pcm: bytes, sizes: list[int], start: int = 0,
           gaps: dict[int, int] | None = None) -> list[AudioBlock]:
    """`pcm` cut into blocks of `sizes` samples (cycled), on the session clock from `start`;
    `gaps` maps a sample of `pcm` to a jump of the session clock there (no audio for it)."""
    gaps = gaps or {}
    out, pos, i = [], 0, 0
    while pos * 2 < len(pcm):
        n = sizes[i % len(sizes)]
        n = min([n] + [g - pos for g in gaps if pos < g < pos + n])
        start += gaps.get(pos, 0)
        out.append(AudioBlock(start + pos, pcm[pos * 2:(pos + n) * 2]))
        pos, i = pos + n, i + 1
    return out


def pcm_of(samples: range) -> bytes:
    return b"".join((v % 30000).to_bytes(2, "little", signed=True) for v in samples)


# --- ReplayBuffer ---------------------------------------------------------------------------
def test_read_joins_blocks_up_to_the_request_size_and_stops_at_gaps() -> None:
    buf = ReplayBuffer(10)
    for b in blocks(pcm_of(range(5000)), [300, 700, 50]):
        buf.push(b)
    buf.push(AudioBlock(6000, pcm_of(range(6000, 6100))))  # after a gap
    piece = buf.read(0, 1600)
    assert piece is not None and (piece.start, piece.samples) == (0, 1600)
    assert piece.pcm == pcm_of(range(1600))
    piece = buf.read(4900, 1600)
    assert piece is not None and (piece.start, piece.end) == (4900, 5000)  # the gap ends it
    piece = buf.read(5000, 1600)
    assert piece is not None and (piece.start, piece.end) == (6000, 6100)  # skips the gap
    assert piece.pcm == pcm_of(range(6000, 6100))
    assert buf.read(6100, 1600) is None


def test_overlapping_audio_is_cut_so_the_clock_never_goes_back() -> None:
    buf = ReplayBuffer(10)
    buf.push(AudioBlock(0, pcm_of(range(1000))))
    buf.push(AudioBlock(500, pcm_of(range(500, 1500))))
    buf.push(AudioBlock(200, pcm_of(range(200, 400))))
    assert buf.end == 1500 and buf.retained_s == 1500 / SAMPLE_RATE
    piece = buf.read(0, 5000)
    assert piece is not None and piece.pcm == pcm_of(range(1500))


def test_overflow_drops_oldest_and_counts_lost_only_at_a_call_boundary() -> None:
    buf = ReplayBuffer(1.0)  # 16000 samples
    for b in blocks(pcm_of(range(40000)), [1000]):
        buf.push(b)
    assert buf.retained_s == 1.0 and buf.start == 24000
    # The call that got the dropped audio may still finalize it: nothing lost then.
    buf.finalize(10000)
    assert buf.take_lost() == 24000 - 10000
    assert buf.delivered_until == 24000 and buf.take_lost() == 0  # counted once


def test_dropped_audio_finalized_later_is_not_lost() -> None:
    buf = ReplayBuffer(1.0)
    for b in blocks(pcm_of(range(30000)), [1600]):
        buf.push(b)
    buf.finalize(30000)  # e.g. a clean half-close covered everything sent
    assert buf.take_lost() == 0 and buf.retained_s == 0 and buf.read(0, 10) is None


def test_audio_skipped_by_a_live_call_is_lost_at_once() -> None:
    buf = ReplayBuffer(1.0)
    for b in blocks(pcm_of(range(40000)), [1000]):
        buf.push(b)
    # A call had sent up to 5000 when the buffer dropped up to 24000.
    assert buf.take_skipped(5000, 24000) == 19000
    # What it had sent (0..5000) is still only at risk: finalizing it loses nothing.
    buf.finalize(5000)
    assert buf.take_lost() == 0


def test_finalize_trims_inside_a_block() -> None:
    buf = ReplayBuffer(10)
    buf.push(AudioBlock(0, pcm_of(range(3200))))
    buf.finalize(1234)
    piece = buf.read(0, 5000)
    assert piece is not None and piece.start == 1234 and piece.pcm == pcm_of(range(1234, 3200))


# --- Transcript -------------------------------------------------------------------------------
def _final(words: list[tuple[str, float, float]], end: float, transcript: str | None = None,
           speaker: str | None = None) -> RawResult:
    return RawResult(True, transcript or " ".join(w for w, _, _ in words), 0.9,
                     tuple(RawWord(w, s, e, 0.8, speaker) for w, s, e in words), end)


def test_v1_repeated_words_are_delivered_once() -> None:
    buf = ReplayBuffer(30)
    buf.push(AudioBlock(0, b"\0\0" * SAMPLE_RATE * 10))
    t = Transcript(buf)
    call = OffsetMap()
    call.add(0, SAMPLE_RATE * 10)
    first = t.on_result(_final([("Hello", 0.5, 1.0), ("there.", 1.0, 1.5)], 1.8, "Hello there."), call)
    assert first is not None and first.transcript == "Hello there."
    assert [w.word for w in first.words] == ["hello", "there"]
    assert [w.punctuated_word for w in first.words] == ["Hello", "there."]
    # v1 with diarization: the next final repeats every word of the call.
    again = t.on_result(_final([("Hello", 0.5, 1.0), ("there.", 1.0, 1.5), ("How", 2.0, 2.4),
                                ("How", 2.0, 2.4), ("are", 2.4, 2.8)], 3.0, "How are"), call)
    assert again is not None and [w.word for w in again.words] == ["how", "are"]
    assert again.transcript == "How are" and again.start == 1.8 and again.end == 3.0
    assert buf.delivered_until == 3 * SAMPLE_RATE


def test_after_a_cut_the_new_call_maps_from_its_replay_start() -> None:
    buf = ReplayBuffer(30)
    for b in blocks(b"\0\0" * SAMPLE_RATE * 20, [1600]):
        buf.push(b)
    t = Transcript(buf)
    old = OffsetMap()
    old.add(0, SAMPLE_RATE * 12)
    t.on_result(_final([("a", 9.0, 9.5)], 10.0), old)
    # New call replays from delivered_until = 10 s; it re-hears audio up to 10.0 and then new words.
    new = OffsetMap()
    piece = buf.read(buf.delivered_until, SAMPLE_RATE * 5)
    assert piece is not None and piece.start == 10 * SAMPLE_RATE
    new.add(piece.start, piece.samples)
    interim = t.on_result(RawResult(False, "a b", 0.0, (RawWord("a", 0.0, 0.0), RawWord("b", 0.2, 0.7)),
                                    0.7), new)
    assert interim is not None and not interim.is_final and interim.transcript == "b"
    ev = t.on_result(_final([("b", 0.2, 0.7), ("c", 0.7, 1.2)], 1.5), new)
    assert ev is not None and [(w.word, w.start, w.end) for w in ev.words] == [
        ("b", 10.2, 10.7), ("c", 10.7, 11.2)]


def test_a_word_never_starts_before_delivered_audio_ended() -> None:
    buf = ReplayBuffer(30)
    buf.push(AudioBlock(0, b"\0\0" * SAMPLE_RATE * 5))
    t = Transcript(buf)
    call = OffsetMap()
    call.add(0, SAMPLE_RATE * 5)
    t.on_result(_final([("a", 0.5, 1.0)], 1.0), call)
    ev = t.on_result(_final([("b", 0.9, 1.4)], 1.6), call)
    assert ev is not None and ev.words[0].start == 1.0 and ev.words[0].end == 1.4


def test_speech_events_alternate_and_replays_do_not_repeat_them() -> None:
    buf = ReplayBuffer(30)
    buf.push(AudioBlock(0, b"\0\0" * SAMPLE_RATE * 20))
    t = Transcript(buf)

    def said(kind: str, offset: float, call: OffsetMap) -> list[tuple[str, float]]:
        return [(e.kind, e.start) for e in t.on_speech_event(RawSpeechEvent(kind, offset), call)]

    call = OffsetMap()
    call.add(16000, SAMPLE_RATE * 5)
    assert said("speech_started", 0.5, call) == [("speech_started", 1.5)]
    assert said("speech_started", 0.6, call) == []  # still the same utterance
    # Cut mid-utterance; the next call replays from delivered_until (0) and hears it begin again.
    again = OffsetMap()
    again.add(0, SAMPLE_RATE * 5)
    assert said("speech_started", 1.55, again) == []
    assert said("speech_ended", 2.5, again) == [("speech_ended", 2.5)]
    assert said("speech_ended", 2.6, again) == []
    assert said("speech_started", 3.0, again) == [("speech_started", 3.0)]
    # The utterance is finalized, then the call is cut before it says "ended": the next
    # begin first closes the finalized one at delivered_until.
    t.on_result(_final([("a", 3.0, 3.5)], 3.8), again)
    after = OffsetMap()
    after.add(round(3.8 * SAMPLE_RATE), SAMPLE_RATE * 5)
    assert said("speech_started", 0.7, after) == [("speech_ended", 3.8), ("speech_started", 4.5)]


def test_plain_word_lowercases_and_strips_trailing_punctuation() -> None:
    assert [plain_word(w) for w in ["Hello,", "it's", "U.S.", "?"]] == ["hello", "it's", "u.s", "?"]


# --- policies ---------------------------------------------------------------------------------
def test_rotation_is_due_at_a_quiet_moment_or_at_the_limit() -> None:
    p = RotationPolicy.for_limit(290)
    assert p.quiet_s == 30
    assert not p.due(250, 100, after_final=True)
    assert p.due(261, 100, after_final=True) and not p.due(261, 100, after_final=False)
    assert p.due(10, 290, after_final=False)  # a stalled stream: wall time decides
    assert p.due(290, 3, after_final=False)  # audio fed faster than real time: audio decides


def test_backoff_grows_with_jitter_up_to_its_cap() -> None:
    b = Backoff(initial=0.5, maximum=4.0)
    assert [b.delay(n, lambda: 0.0) for n in range(1, 6)] == [0.25, 0.5, 1.0, 2.0, 2.0]
    assert [b.delay(n, lambda: 1.0) for n in range(1, 6)] == [0.5, 1.0, 2.0, 4.0, 4.0]


# --- the invariant, as a property -------------------------------------------------------------
SCRIPT_PCM, SCRIPT_WORDS = encode(utterances(8, words=3, word_s=0.35, gap_s=0.5))


def _raw(out: Out) -> RawResult:
    return RawResult(out.is_final, " ".join(f"w{i}" for i, _, _ in out.words), 0.9,
                     tuple(RawWord(f"w{i}", s / SAMPLE_RATE, e / SAMPLE_RATE) for i, s, e in out.words),
                     out.end / SAMPLE_RATE)


def _silent(sample: int) -> bool:
    return not any(w.start <= sample < w.end for w in SCRIPT_WORDS)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=st.lists(st.integers(40, 9000), min_size=1, max_size=6),
       cuts=st.lists(st.integers(0, len(SCRIPT_PCM) // 2), max_size=8),
       closes=st.lists(st.integers(0, len(SCRIPT_PCM) // 2), max_size=4),
       start=st.integers(0, 10**7),
       gaps=st.dictionaries(st.integers(1, len(SCRIPT_PCM) // 2 - 1), st.integers(1, 40000),
                            max_size=3))
def test_cuts_and_closes_deliver_every_word_once_in_place(
        sizes: list[int], cuts: list[int], closes: list[int], start: int, gaps: dict[int, int]
) -> None:
    """Blocks of any size, gaps in the session audio, calls cut anywhere, closed in silence."""
    gaps = {g: n for g, n in gaps.items() if _silent(g)}
    shift = {w.id: start + sum(n for g, n in gaps.items() if g <= w.start) for w in SCRIPT_WORDS}
    buf = ReplayBuffer(30)
    t = Transcript(buf)
    marks = sorted([(c, "cut") for c in cuts] + [(c, "close") for c in closes if _silent(c)])
    delivered = []

    def new_call() -> tuple[Recognizer, OffsetMap, int]:
        assert buf.take_lost() == 0
        return Recognizer(endpoint_s=0.3, interim=True, vad=False), OffsetMap(), buf.delivered_until

    def apply(outs: list[Out], call: OffsetMap) -> None:
        for out in outs:
            ev = t.on_result(_raw(out), call)
            if ev is not None and ev.is_final:
                delivered.extend(ev.words)

    rec, call, cursor = new_call()
    for block in blocks(SCRIPT_PCM, sizes, start, gaps):
        buf.push(block)
        while (piece := buf.read(cursor, 1600)) is not None:
            mark = marks[0][0] + start + sum(n for g, n in gaps.items() if g <= marks[0][0]) \
                if marks else None
            if mark is not None and piece.start >= mark:
                if marks.pop(0)[1] == "close":  # half-close: Google answers all it was sent
                    apply(rec.finish(), call)
                    if call.session_end is not None:
                        buf.finalize(call.session_end)
                rec, call, cursor = new_call()  # a cut replays from delivered_until
                continue
            if mark is not None and piece.end > mark:
                piece = AudioBlock(piece.start, piece.pcm[:(mark - piece.start) * 2])
            call.add(piece.start, piece.samples)
            apply(rec.feed(piece.pcm), call)
            cursor = piece.end
    apply(rec.finish(), call)
    assert [w.word for w in delivered] == [w.text for w in SCRIPT_WORDS]
    assert [(w.start, w.end) for w in delivered] == [
        ((w.start + shift[w.id]) / SAMPLE_RATE, (w.end + shift[w.id]) / SAMPLE_RATE)
        for w in SCRIPT_WORDS]


@pytest.mark.parametrize("bad", [0, -1])
def test_replay_bound_must_be_positive(bad: float) -> None:
    with pytest.raises(ValueError):
        ReplayBuffer(bad)


def test_one_sample_blocks_are_coalesced_and_a_replay_read_stays_cheap() -> None:
    # A hostile client's 2-byte frames arrive as 1-sample blocks: 30 s of them is 480k blocks.
    # The buffer must hold them as a few >= 20 ms blocks, and replaying the whole 30 s from
    # `delivered_until` (300 reads of 100 ms, as a call after a rotation does) must stay cheap.
    import time

    buf = ReplayBuffer(30.0)
    total = 30 * SAMPLE_RATE
    for i in range(total):
        buf.push(AudioBlock(i, b"\x01\x00"))
    assert buf.retained_s == pytest.approx(30.0)
    assert buf.blocks <= total // MIN_BLOCK_SAMPLES + 1
    started = time.perf_counter()
    cursor, got = buf.delivered_until, 0
    while (piece := buf.read(cursor, SAMPLE_RATE // 10)) is not None:
        got += piece.samples
        cursor = piece.end
    elapsed = time.perf_counter() - started
    assert got == total
    assert elapsed < 0.25, f"replaying 30 s of 1-sample blocks took {elapsed:.3f} s"


def test_reads_in_the_middle_find_their_block_and_drops_keep_the_index() -> None:
    buf = ReplayBuffer(1.0)
    pcm = bytes(range(256)) * 125  # 32000 bytes = 16000 samples
    for b in blocks(pcm, [7, 400, 1, 3200]):
        buf.push(b)
    piece = buf.read(5000, 10)
    assert piece is not None and piece.start == 5000 and piece.pcm == pcm[10000:10020]
    buf.push(AudioBlock(16000, b"\x05\x00" * 800))  # overflows: the oldest 800 samples go
    assert buf.start == 800
    piece = buf.read(0, 3)
    assert piece is not None and piece.start == 800 and piece.pcm == pcm[1600:1606]
    buf.finalize(12345)
    piece = buf.read(0, 2)
    assert piece is not None and piece.start == 12345 and piece.pcm == pcm[24690:24694]
