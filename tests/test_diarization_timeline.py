"""SpeakerTimeline: placement on the session clock, labels, turns, bounded memory."""

from __future__ import annotations

import numpy as np
import pytest

from edge.clock import FRAME_S
from edge.diarization.timeline import SpeakerTimeline, SpeakerTurn


def frames(*rows: tuple[float, float, float, float], repeat: int = 1) -> np.ndarray:
    return np.repeat(np.array(rows, dtype=np.float32), repeat, axis=0)


def one_hot(speaker: int | None, n: int, p: float = 0.9) -> np.ndarray:
    out = np.full((n, 4), 0.05, dtype=np.float32)
    if speaker is not None:
        out[:, speaker] = p
    return out


def test_covered_until_follows_frame_index_and_gaps_are_unlabelled() -> None:
    tl = SpeakerTimeline()
    assert tl.covered_until == 0.0
    tl.add(0, one_hot(1, 10))
    assert tl.covered_until == pytest.approx(10 * FRAME_S)
    tl.add(20, one_hot(2, 5))  # frames 10..19 never came: covered, but nobody labelled
    assert tl.frames_end == 25
    assert tl.covered_until == pytest.approx(2.0)
    assert tl.speaker_for(0.9, 1.5) == (None, 0.0)
    assert tl.speaker_for(1.6, 1.9)[0] == 1  # slot 2, the second to speak
    assert tl.speaker_for(0.1, 0.7)[0] == 0  # slot 1, the first


def test_frames_must_arrive_in_order_and_be_n_by_4() -> None:
    tl = SpeakerTimeline()
    tl.add(0, one_hot(0, 5))
    with pytest.raises(ValueError, match="before"):
        tl.add(3, one_hot(0, 5))
    with pytest.raises(ValueError, match="n x 4"):
        tl.add(5, np.zeros((3, 2), dtype=np.float32))


def test_speaker_for_picks_the_most_active_speaker_weighted_by_overlap() -> None:
    tl = SpeakerTimeline()
    # 0.0-0.8 s slot 0 (speaker 0), 0.8-1.6 s slot 3 (speaker 1)
    tl.add(0, np.concatenate([one_hot(0, 10), one_hot(3, 10)]))
    assert tl.speaker_for(0.1, 0.5) == (0, pytest.approx(0.9))
    assert tl.speaker_for(0.85, 1.5)[0] == 1
    # a word over the boundary, mostly in the second speaker's part
    speaker, conf = tl.speaker_for(0.7, 1.4)
    assert speaker == 1 and 0.5 < conf < 0.9
    # mostly speaker 0's part
    assert tl.speaker_for(0.2, 0.9)[0] == 0
    # a zero-length span asks about the frame containing it
    assert tl.speaker_for(1.0, 1.0)[0] == 1


def test_speaker_for_is_none_below_threshold_and_beyond_coverage() -> None:
    tl = SpeakerTimeline(threshold=0.5)
    tl.add(0, one_hot(None, 10))  # silence: every slot at 0.05
    speaker, conf = tl.speaker_for(0.0, 0.8)
    assert speaker is None and conf == pytest.approx(0.05)
    assert tl.speaker_for(5.0, 6.0) == (None, 0.0)  # not covered yet
    # half a span active at 0.9, half silent: mean 0.475 stays under the threshold
    tl.add(10, one_hot(1, 5))
    tl.add(15, one_hot(None, 5))
    speaker, conf = tl.speaker_for(0.8, 1.6)
    assert speaker is None and conf == pytest.approx(0.475)


def test_overlapping_speakers_the_stronger_wins() -> None:
    tl = SpeakerTimeline()
    tl.add(0, frames((0.7, 0.95, 0.1, 0.1), repeat=10))
    assert tl.speaker_for(0.0, 0.8) == (1, pytest.approx(0.95))


def test_turns_incremental_with_gap_bridging_and_min_length() -> None:
    tl = SpeakerTimeline(gap_s=0.24, min_turn_s=0.16)  # gap 3 frames, min 2 frames
    tl.add(0, one_hot(0, 10))
    # speaker 0 is still talking: one growing (interim) turn
    assert tl.pop_turns() == [SpeakerTurn(0, 0.0, pytest.approx(0.8), False)]
    assert tl.pop_turns() == []  # nothing grew, nothing repeated
    tl.add(10, one_hot(None, 2))  # a 2-frame pause is bridged
    assert tl.pop_turns() == []
    tl.add(12, one_hot(0, 3))
    turns = tl.pop_turns()
    assert turns == [SpeakerTurn(0, 0.0, pytest.approx(15 * FRAME_S), False)]
    tl.add(15, one_hot(1, 1))  # a one-frame blip of slot 1: too short to report or number
    tl.add(16, one_hot(2, 10))  # speaker 0 has been silent > 3 frames: turn ends
    turns = tl.pop_turns()
    assert SpeakerTurn(0, 0.0, pytest.approx(15 * FRAME_S), True) in turns
    assert len(turns) == 2  # no turn for the blip
    assert next(t for t in turns if t.speaker == 1).is_final is False  # slot 2 is speaker 1
    tl.finish()
    assert tl.pop_turns() == [SpeakerTurn(1, pytest.approx(16 * FRAME_S), pytest.approx(2.08), True)]


def test_a_gap_ends_open_turns() -> None:
    tl = SpeakerTimeline()
    tl.add(0, one_hot(1, 10))
    tl.add(50, one_hot(1, 10))  # 40 unlabelled frames between (e.g. a worker restart)
    turns = tl.pop_turns(include_open=False)
    assert turns == [SpeakerTurn(0, 0.0, pytest.approx(0.8), True)]
    tl.finish()
    assert tl.pop_turns() == [SpeakerTurn(0, pytest.approx(4.0), pytest.approx(4.8), True)]


def test_bounded_horizon_keeps_only_recent_frames() -> None:
    tl = SpeakerTimeline(horizon_s=8.0)  # 100 frames
    assert tl._buf.nbytes == 100 * 4 * 4
    for i in range(100):  # 80 s of audio, 8 frames at a time, slot = block index mod 4
        tl.add(i * 8, one_hot(i % 4, 8))
    assert tl.covered_until == pytest.approx(64.0)
    assert tl._buf.nbytes == 100 * 4 * 4  # memory did not grow
    assert tl.speaker_for(63.5, 63.9)[0] == 99 % 4  # slots arrived as 0, 1, 2, 3
    assert tl.speaker_for(56.1, 56.5)[0] == 95 % 4  # inside the last 8 s
    assert tl.speaker_for(10.0, 11.0) == (None, 0.0)  # beyond the horizon: forgotten
    # a jump larger than the horizon leaves only unlabelled frames behind it
    tl.skip_to(2000)
    assert tl.speaker_for(150.0, 159.0) == (None, 0.0)


def test_pending_turns_are_bounded() -> None:
    tl = SpeakerTimeline(max_pending_turns=4, gap_s=0.0)
    for i in range(10):  # ten separate turns of speaker 0
        tl.add(i * 6, np.concatenate([one_hot(0, 3), one_hot(None, 3)]))
    turns = tl.pop_turns(include_open=False)
    assert len(turns) == 4 and tl.turns_dropped == 6
    assert turns[-1].start == pytest.approx(9 * 6 * FRAME_S)


def test_speakers_are_numbered_in_arrival_order_whatever_the_slot() -> None:
    tl = SpeakerTimeline(min_turn_s=0.16)
    tl.add(0, one_hot(3, 10))  # slot 3 speaks first
    tl.add(10, one_hot(2, 1))  # slot 2 flickers for one frame: no number
    tl.add(11, one_hot(1, 10))
    tl.add(21, one_hot(2, 10))
    tl.add(31, one_hot(3, 10))  # slot 3 again: still speaker 0
    assert [tl.speaker_for(a, a + 0.3)[0] for a in (0.1, 0.9, 1.8, 2.6)] == [0, 1, 2, 0]
    tl.finish()
    assert [t.speaker for t in tl.pop_turns()] == [0, 1, 2, 0]


def test_a_new_stream_numbers_its_speakers_after_the_last() -> None:
    tl = SpeakerTimeline()
    tl.add(0, one_hot(0, 10))
    tl.add(10, one_hot(1, 10))
    assert tl.speakers == 2
    tl.new_stream()  # e.g. the worker restarted: slot 0 may now be anyone
    tl.add(40, one_hot(0, 10))
    assert tl.speaker_for(3.3, 3.7)[0] == 2  # not 0: that number keeps naming its person
    assert tl.speaker_for(0.1, 0.5)[0] == 0  # earlier frames keep their stream's numbers
    assert tl.speaker_for(0.9, 1.5)[0] == 1
    # a span over the boundary: 5 frames of the old stream's speaker 1, 3 of the new one's
    assert tl.speaker_for(1.2, 3.44) == (1, pytest.approx(0.9 * 5 / 8))
    assert tl.speakers == 3
