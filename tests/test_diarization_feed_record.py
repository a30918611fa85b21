"""SessionFeed's flow control: the one list of units in flight (the session and engine keep none)."""

from __future__ import annotations

import numpy as np

from edge.diarization.feed import FRAME_SAMPLES, SessionFeed


def test_each_unit_sent_is_numbered_and_counted_in_flight_until_answered() -> None:
    feed = SessionFeed(unit_frames=1, max_backlog_s=10)
    feed.start_stream()
    feed.push(0, np.ones(4 * FRAME_SAMPLES, np.float32))
    for t in (10.0, 11.0, 12.0):
        assert feed.take_unit(sent_at=t) is not None
    assert (feed.last_seq, feed.in_flight, feed.oldest_unanswered) == (3, 3, 10.0)
    assert feed.answered(2) == FRAME_SAMPLES  # units 1 and 2 at once (one reply each, in order)
    assert (feed.in_flight, feed.oldest_unanswered) == (1, 12.0)
    assert feed.answered(2) == 0  # already answered: no audio counted twice
    placed = feed.place(0, np.zeros((2, 4), np.float32))  # frames of answered units
    assert [f for f, _ in placed] == [0]
    assert feed.answered(3) == FRAME_SAMPLES
    assert (feed.in_flight, feed.oldest_unanswered) == (0, None)


def test_a_new_stream_starts_with_nothing_in_flight_and_keeps_numbering() -> None:
    feed = SessionFeed(unit_frames=1, max_backlog_s=10)
    feed.start_stream()
    feed.push(0, np.ones(3 * FRAME_SAMPLES, np.float32))
    feed.take_unit(sent_at=1.0)
    feed.take_unit(sent_at=1.0)
    feed.start_stream()  # the worker restarted: what was in flight is gone with it
    assert (feed.in_flight, feed.oldest_unanswered) == (0, None)
    feed.take_unit(sent_at=2.0)
    assert (feed.last_seq, feed.in_flight, feed.oldest_unanswered) == (3, 1, 2.0)
    assert feed.answered(2) == 0  # a late reply from the old stream
    assert feed.in_flight == 1
    feed.stop()
    assert (feed.in_flight, feed.oldest_unanswered) == (0, None)
