"""The session clock on its own: its constants, `AudioBlock` trimming, the overlap rule and the
`OffsetMap` from a receiver's offsets (a Google call's, a diarizer stream's) to session samples."""

from __future__ import annotations

import pytest

from edge.clock import (
    FRAME_S,
    FRAME_SAMPLES,
    PCM_SAMPLE_BYTES,
    SAMPLE_RATE,
    AudioBlock,
    OffsetMap,
    frame_ceil,
    overlap,
    to_samples,
)


def pcm(start: int, n: int) -> bytes:
    """`n` s16le samples whose values are their session sample index (mod 2**15)."""
    return b"".join(((start + i) % 32768).to_bytes(PCM_SAMPLE_BYTES, "little") for i in range(n))


def test_a_frame_is_80_ms_of_whole_samples() -> None:
    assert FRAME_S == 0.08 and FRAME_SAMPLES == round(FRAME_S * SAMPLE_RATE) == 1280
    assert [frame_ceil(s) for s in (0, 1, 1279, 1280, 1281)] == [0, 1280, 1280, 1280, 2560]


# --- the overlap rule and AudioBlock trimming -------------------------------------------------
def test_overlap_counts_only_samples_already_taken() -> None:
    assert overlap(100, None) == 0  # nothing taken yet
    assert overlap(100, 100) == 0  # contiguous
    assert overlap(100, 40) == 0  # a gap is not an overlap
    assert overlap(100, 160) == 60


def test_a_block_since_a_sample_keeps_the_rest_with_its_place() -> None:
    block = AudioBlock(1000, pcm(1000, 500))
    assert block.since(900) is block  # starts later: all of it
    rest = block.since(1200)
    assert (rest.start, rest.samples, rest.pcm) == (1200, 300, pcm(1200, 300))
    gone = block.since(1600)  # ends before: nothing, and it says where
    assert (gone.start, gone.samples) == (1500, 0)


def test_a_block_until_a_sample_keeps_the_head() -> None:
    block = AudioBlock(1000, pcm(1000, 500))
    assert block.until(1100).pcm == pcm(1000, 100)
    assert block.until(2000) == block and block.until(900).samples == 0


# --- OffsetMap --------------------------------------------------------------------------------
def test_offsets_map_across_gaps() -> None:
    m = OffsetMap()
    m.add(48000, 16000)  # offsets 0..1 s = session 3..4 s
    m.add(64000, 8000)  # contiguous: the same piece
    m.add(100000, 16000)  # after a gap: offset 1.5 s = session 6.25 s
    assert m.pieces == 2 and m.sent == 40000 and m.audio_s == 2.5 and m.session_end == 116000
    assert m.to_session(0) == 48000
    assert m.to_session(to_samples(1.2)) == 48000 + 19200
    assert m.to_session(24000) == 100000  # a start on the boundary: the later piece
    assert m.to_session(24000, end=True) == 72000  # an end on the boundary: the earlier one
    assert m.to_session(32000, end=True) == 108000


def test_locate_says_how_far_the_piece_reaches() -> None:
    m = OffsetMap()
    m.add(0, 3 * FRAME_SAMPLES)
    m.add(10 * FRAME_SAMPLES, 2 * FRAME_SAMPLES)
    assert m.locate(FRAME_SAMPLES) == (FRAME_SAMPLES, 2 * FRAME_SAMPLES)
    assert m.locate(3 * FRAME_SAMPLES) == (10 * FRAME_SAMPLES, None)  # the last piece
    # The last piece extends past what was sent (a receiver's padding at its end).
    assert m.locate(9 * FRAME_SAMPLES) == (16 * FRAME_SAMPLES, None)


def test_an_empty_map_is_the_identity() -> None:
    m = OffsetMap()
    assert m.locate(1234) == (1234, None) and m.session_end is None and m.pieces == 0
    m.add(500, 0)  # nothing sent: nothing recorded
    assert m.pieces == 0 and m.session_end is None


def test_overlapping_pieces_are_refused() -> None:
    m = OffsetMap()
    m.add(1000, 100)
    with pytest.raises(ValueError, match="overlaps what was sent"):
        m.add(1050, 100)
    with pytest.raises(ValueError, match="samples must be >= 0"):
        m.add(2000, -1)
    assert m.sent == 100  # unchanged by the refusals


def test_a_restarted_receiver_maps_from_where_the_session_is() -> None:
    # The first call (or diarizer stream) is cut at session sample 30000; its replacement starts
    # over at offset 0 with the audio from 20000 on (a replay): both map onto one clock.
    first, second = OffsetMap(), OffsetMap()
    first.add(0, 30000)
    second.add(20000, 15000)
    assert first.to_session(25000) == second.to_session(5000) == 25000
    assert second.to_session(0) == 20000


def test_rounding_at_block_edges() -> None:
    m = OffsetMap()
    m.add(0, 24000)  # offsets [0, 1.5 s)
    m.add(40000, 16000)  # offsets [1.5 s, 2.5 s) = session [2.5 s, 3.5 s)
    # A time a hair under the edge rounds onto it: as an end it stays in the piece before.
    assert m.to_session(to_samples(1.49999), end=True) == 24000
    assert m.to_session(to_samples(1.49999)) == 40000
    # Just inside either side of the edge.
    assert m.to_session(to_samples(1.4999)) == 23998
    assert m.to_session(to_samples(1.5001), end=True) == 40002


def test_forgetting_keeps_the_map_bounded_and_later_offsets_exact() -> None:
    m = OffsetMap()
    for k in range(1000):  # a receiver sent 1000 pieces, each after a gap
        m.add(k * 3 * FRAME_SAMPLES, FRAME_SAMPLES)
        m.forget_before(max(0, (k - 1) * FRAME_SAMPLES))
        assert m.pieces <= 3
    assert m.to_session(999 * FRAME_SAMPLES + 5) == 999 * 3 * FRAME_SAMPLES + 5
    assert m.to_session(998 * FRAME_SAMPLES) == 998 * 3 * FRAME_SAMPLES
    m.forget_before(10**9)  # past everything: the last piece stays
    assert m.pieces == 1 and m.to_session(999 * FRAME_SAMPLES) == 999 * 3 * FRAME_SAMPLES


# --- the one "active" rule ----------------------------------------------------------------------
def test_a_slot_at_exactly_the_threshold_is_active_everywhere() -> None:
    """The timeline, the RTTM writer and slot folding share ACTIVE_THRESHOLD with one rule (>=)."""
    import numpy as np

    from edge.clock import ACTIVE_THRESHOLD, SLOTS
    from edge.diarization.files import rttm_lines
    from edge.diarization.timeline import SpeakerTimeline
    from edge.diarization.worker.stream_core import Folding

    at = np.zeros((3, SLOTS), np.float32)
    at[:, 2] = ACTIVE_THRESHOLD
    below = at.copy()
    below[:, 2] = np.nextafter(np.float32(ACTIVE_THRESHOLD), np.float32(0))

    assert [len(rttm_lines(p, "f")) for p in (at, below)] == [1, 0]

    def voiced(p: np.ndarray) -> list[bool]:
        timeline = SpeakerTimeline()
        timeline.add(0, p)
        return timeline.voiced(0)[1].tolist()

    assert voiced(at) == [True] * 3 and voiced(below) == [False] * 3

    def folded(p: np.ndarray) -> dict[int, int]:
        folding = Folding(max_speakers=2)
        folding.observe(p, np.ones((len(p), 8)))
        return folding.fold_map

    assert folded(at) == {2: 1} and folded(below) == {}
