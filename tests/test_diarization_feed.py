"""The per-session feed (edge/diarization/feed.py): whole units in order, overlap and gaps,
catch-up when the worker falls behind, and mapping a stream's frames onto the session clock."""

from __future__ import annotations

import numpy as np
import pytest

from edge.clock import FRAME_SAMPLES
from edge.diarization.feed import SessionFeed


def ramp(start: int, n: int) -> np.ndarray:
    """Samples whose value encodes their session sample index (exact in float32 up to 2**24)."""
    return np.arange(start, start + n, dtype=np.float32)


def test_feed_sends_whole_units_in_order() -> None:
    feed = SessionFeed(unit_frames=2, max_backlog_s=10)
    feed.start_stream()
    for i in range(10):
        feed.push(i * 1000, ramp(i * 1000, 1000))
    units = []
    while (u := feed.take_unit()) is not None:
        units.append(u)
    assert [len(u) for u in units] == [2560] * 3 and feed.pending_samples == 10000 - 7680
    np.testing.assert_array_equal(np.concatenate(units), ramp(0, 7680))
    last = feed.take_unit(flush=True)
    assert last is not None and len(last) == 10000 - 7680
    assert feed.take_unit(flush=True) is None


def test_feed_trims_overlap_fills_gaps_and_drops_audio_while_inactive() -> None:
    feed = SessionFeed(unit_frames=1, max_backlog_s=10)
    feed.push(0, ramp(0, 5000))  # no stream yet: dropped
    assert feed.pending_samples == 0
    feed.start_stream()
    assert feed.next_frame == 4  # 5000 rounded up to a frame boundary (5120)
    feed.push(4000, ramp(4000, 2000))  # overlaps 1000 samples already seen
    feed.push(6000, ramp(6000, 1000))
    # the stream starts on a frame boundary: 5120
    unit = feed.take_unit()
    assert unit is not None and unit[0] == 5120
    feed.push(9000, ramp(9000, 400))  # a 2000-sample gap becomes silence
    parts = []
    while (u := feed.take_unit(flush=True)) is not None:
        parts.append(u)
    rest = np.concatenate(parts)
    assert len(rest) == 7000 - 6400 + 2000 + 400 and len(parts[-1]) < FRAME_SAMPLES
    assert rest[600:2600].max() == 0.0 and rest[-1] == 9399


def test_feed_catch_up_skips_to_the_newest_audio_and_maps_frames_across_the_skip() -> None:
    feed = SessionFeed(unit_frames=1, max_backlog_s=1.0, keep_s=0.24)  # 16000 samples bound
    feed.start_stream()
    feed.push(0, ramp(0, 3 * FRAME_SAMPLES))
    sent = [feed.take_unit() for _ in range(3)]  # stream frames 0..2 = session frames 0..2
    assert all(u is not None for u in sent)
    skipped = 0
    for i in range(30):  # the worker stalls: 30 frames arrive, more than the 1 s bound
        skipped += feed.push((3 + i) * FRAME_SAMPLES, ramp((3 + i) * FRAME_SAMPLES, FRAME_SAMPLES))
    assert skipped > 0 and feed.pending_samples <= 16000
    assert feed.skipped_frames == skipped
    a, b = feed.skipped[0][0], feed.skipped[-1][1]  # possibly several skips in a row
    assert a == pytest.approx(3 * 0.08) and feed.is_skipped((a + b) / 2) and not feed.is_skipped(0.1)
    nxt = feed.take_unit()
    assert nxt is not None and nxt[0] == b * 16000 and nxt[0] % FRAME_SAMPLES == 0
    # frames 0..3 of the stream come back: 0..2 in place, 3 lands after the skip
    placed = feed.place(0, np.full((4, 4), 0.5, np.float32))
    assert [(f, len(p)) for f, p in placed] == [(0, 3), (round(b / 0.08), 1)]


def test_feed_maps_a_new_stream_onto_where_the_session_is() -> None:
    feed = SessionFeed(unit_frames=2, max_backlog_s=10)
    feed.start_stream()
    feed.push(0, ramp(0, 4 * FRAME_SAMPLES))
    feed.take_unit()
    feed.take_unit()
    feed.start_stream()  # the worker restarted: the new stream begins at the next audio
    feed.push(4 * FRAME_SAMPLES, ramp(4 * FRAME_SAMPLES, 2 * FRAME_SAMPLES))
    u = feed.take_unit()
    assert u is not None and u[0] == 4 * FRAME_SAMPLES
    assert [(f, len(p)) for f, p in feed.place(0, np.zeros((2, 4), np.float32))] == [(4, 2)]


def test_feed_backlog_stays_bounded_over_a_long_stall() -> None:
    feed = SessionFeed(unit_frames=4, max_backlog_s=2.0, keep_s=0.5)
    feed.start_stream()
    for i in range(3000):  # 10 minutes in 0.2 s blocks, nothing taken
        feed.push(i * 3200, np.zeros(3200, np.float32))
        assert feed.pending_samples <= 2 * 16000 + 3200
    assert len(feed.skipped) == 32  # only the most recent spans are remembered


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_frame_lands_where_its_audio_was_across_gaps_and_skips(seed: int) -> None:
    """A worker that stalls now and then (catch-up skips), audio with gaps, frames returned in
    batches of any size: each stream frame is placed on the session frame its samples came
    from, in order, none twice."""
    rng = np.random.default_rng(seed)
    feed = SessionFeed(unit_frames=2, max_backlog_s=0.5, keep_s=0.16)
    feed.start_stream()
    pos, sent, returned = 0, 0, 0
    where: dict[int, int] = {}  # stream frame -> the session frame its audio came from
    placed: list[int] = []  # session frame of each stream frame returned, as `place` says
    for _ in range(400):
        pos += int(rng.choice([0, 0, 0, 700, 3000, 20000]))  # sometimes a gap in the audio
        n = int(rng.integers(100, 2500))
        feed.push(pos, ramp(pos, n) + 1)  # value = session sample + 1; gap filler is 0
        pos += n
        for _ in range(int(rng.choice([0, 0, 1, 3]))):  # the worker takes 0..3 units
            unit = feed.take_unit()
            if unit is None:
                break
            for k in range(len(unit) // FRAME_SAMPLES):
                frame = unit[k * FRAME_SAMPLES:(k + 1) * FRAME_SAMPLES]
                audio = np.flatnonzero(frame)
                if len(audio):  # a frame of gap filler says nothing about where it is
                    first = int(frame[audio[0]]) - 1 - int(audio[0])
                    where[sent // FRAME_SAMPLES + k] = first // FRAME_SAMPLES
            sent += len(unit)
        ready = sent // FRAME_SAMPLES - returned
        if ready and rng.random() < 0.5:  # frames come back in batches of any size
            count = int(rng.integers(1, ready + 1))
            got = feed.place(returned, np.zeros((count, 4), np.float32))
            assert sum(len(p) for _, p in got) == count
            placed += [frame + i for frame, probs in got for i in range(len(probs))]
            returned += count
    assert feed.skipped_frames > 0 and len(where) > 100  # the case really happened
    assert placed == sorted(set(placed))  # in order, none twice
    assert {s: placed[s] for s in where if s < returned} == {s: f for s, f in where.items()
                                                             if s < returned}
