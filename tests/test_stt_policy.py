"""The upstream run's decisions between calls (edge/stt/policy.py), without a server or a clock."""

from __future__ import annotations

import pytest

from edge.stt.policy import (
    ROTATE,
    Backoff,
    CallEnd,
    CallState,
    Decision,
    Outcome,
    PendingFlushes,
    RetryPolicy,
    check_transition,
)

BACKOFF = Backoff(initial=1.0, maximum=8.0)
PROBE_S = 0.5


def policy(end_timeout_s: float = 30.0) -> RetryPolicy:
    # rand() = 1.0: the delay is the cap itself, so the streak length shows in it.
    return RetryPolicy(BACKOFF, PROBE_S, end_timeout_s, rand=lambda: 1.0)


def failed(kind: CallEnd) -> Outcome:
    return Outcome(kind, error=RuntimeError(kind.value))


def test_the_first_call_has_no_cause_and_no_probe() -> None:
    p = policy()
    assert (p.cause, p.probe, p.failures) == (None, False, 0)


def test_a_clean_end_opens_the_next_call_at_once_with_its_cause() -> None:
    p = policy()
    assert p.after(Outcome(CallEnd.CLEAN, ROTATE), responded=True, age_s=9.0) == Decision()
    assert p.cause == ROTATE
    # A FLUSH's half-close has no cause: the next call is no restart.
    assert p.after(Outcome(CallEnd.CLEAN, None), responded=False, age_s=0.1) == Decision()
    assert p.cause is None


def test_a_rotation_cut_is_no_failure_and_ends_a_streak() -> None:
    p = policy()
    p.after(failed(CallEnd.RETRY), responded=False, age_s=1.0)
    assert p.failures == 1
    assert p.after(Outcome(CallEnd.CUT, ROTATE), responded=False, age_s=5.0) == Decision()
    assert (p.failures, p.cause) == (0, ROTATE)


def test_failures_in_a_row_back_off_longer_and_a_response_resets_the_streak() -> None:
    p = policy()
    waits = [p.after(failed(CallEnd.RETRY), responded=False, age_s=1.0) for _ in range(5)]
    assert [d.wait_s for d in waits] == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert all(d.failed and not d.stop for d in waits)
    assert p.cause == "error"
    # This call got responses before it failed: the streak starts again.
    assert p.after(failed(CallEnd.RETRY), responded=True, age_s=20.0).wait_s == 1.0


@pytest.mark.parametrize("kind", [CallEnd.CLOSED, CallEnd.CUT])
def test_a_server_close_or_a_drain_timeout_counts_as_a_failure(kind: CallEnd) -> None:
    p = policy()
    d = p.after(Outcome(kind, "drain timeout" if kind is CallEnd.CUT else "closed by the server"),
                responded=False, age_s=3.0)
    assert d == Decision(wait_s=1.0, failed=True)
    assert p.cause == "error"


def test_googles_limit_reconnects_at_once_only_the_first_time() -> None:
    p = policy()
    assert p.after(failed(CallEnd.LIMIT), responded=True, age_s=300.0) == Decision(failed=True)
    assert p.cause == "limit"
    # Again without a single response: now it is a streak, and it backs off.
    assert p.after(failed(CallEnd.LIMIT), responded=False, age_s=0.1).wait_s == 2.0


def test_fatal_stops_the_run() -> None:
    p = policy()
    assert p.after(failed(CallEnd.FATAL), responded=True, age_s=1.0) == Decision(failed=True,
                                                                                 stop=True)


def test_two_unclear_failures_at_the_start_make_the_next_call_probe() -> None:
    p = policy()
    p.after(failed(CallEnd.UNCLEAR), responded=False, age_s=0.1)
    assert not p.probe  # one may be a transient error that raced: it does not pay the wait
    p.after(failed(CallEnd.UNCLEAR), responded=False, age_s=0.1)
    assert p.probe
    # The probing call fails the same way: the next one probes again.
    p.after(failed(CallEnd.UNCLEAR), responded=False, age_s=0.1)
    assert p.probe
    # Any other ending stops probing and restarts the count.
    p.after(failed(CallEnd.RETRY), responded=False, age_s=0.1)
    assert (p.probe, p.unclear) == (False, 0)
    p.after(failed(CallEnd.UNCLEAR), responded=False, age_s=0.1)
    assert not p.probe


@pytest.mark.parametrize(("responded", "age_s"), [(True, 0.1), (False, 2 * PROBE_S)])
def test_unclear_failures_later_in_a_call_do_not_probe(responded: bool, age_s: float) -> None:
    p = policy()
    for _ in range(3):
        p.after(failed(CallEnd.UNCLEAR), responded=responded, age_s=age_s)
    assert not p.probe


def test_giving_up_after_the_audio_ended_needs_failures_for_the_whole_timeout() -> None:
    p = policy(end_timeout_s=30.0)
    assert not p.give_up(100.0, ended=False)
    assert p.ended_at is None
    assert not p.give_up(200.0, ended=True)  # the end is seen here, at 200
    assert not p.give_up(500.0, ended=True)  # long after, but nothing has failed
    p.after(failed(CallEnd.RETRY), responded=False, age_s=1.0)
    assert not p.give_up(230.0, ended=True)
    assert p.give_up(230.5, ended=True)
    # A call that works ends the streak: no giving up while Google answers.
    p.after(Outcome(CallEnd.CLEAN), responded=True, age_s=1.0)
    assert not p.give_up(900.0, ended=True)


def test_a_call_state_only_moves_forward() -> None:
    assert check_transition(CallState.OPEN, CallState.CLOSING) is CallState.CLOSING
    assert check_transition(CallState.OPEN, CallState.HALF_CLOSED) is CallState.HALF_CLOSED
    assert check_transition(CallState.CLOSING, CallState.HALF_CLOSED) is CallState.HALF_CLOSED
    for state in (CallState.OPEN, CallState.CLOSING, CallState.HALF_CLOSED):
        assert check_transition(state, CallState.FINISHED) is CallState.FINISHED
    for old, new in [(CallState.HALF_CLOSED, CallState.CLOSING),
                     (CallState.CLOSING, CallState.CLOSING),
                     (CallState.FINISHED, CallState.HALF_CLOSED),
                     (CallState.FINISHED, CallState.OPEN)]:
        with pytest.raises(RuntimeError, match=f"from {old.name} to {new.name}"):
            check_transition(old, new)


def test_flushes_are_answered_once_their_audio_is_final() -> None:
    f = PendingFlushes()
    f.add(100)
    f.add(250)
    assert (len(f), f.first) == (2, 100)
    assert f.answer(99) == []  # audio before the first FLUSH is not final yet
    assert f.answer(100) == [100]
    assert f.first == 250
    assert f.answer(None) == [250]  # nothing unfinalized: every FLUSH is answered
    assert (len(f), f.first) == (0, None)


def test_a_flush_flood_is_coalesced_but_each_flush_answered() -> None:
    f = PendingFlushes(limit=2)
    f.add(100)
    f.add(100)  # no audio since the last one: it joins it
    f.add(200)
    f.add(300)  # past the limit: joins the newest, which moves up to 300
    f.add(400)
    assert len(f) == 2
    assert f.answer(None) == [100, 100, 400, 400, 400]


def test_a_flush_queue_needs_room() -> None:
    with pytest.raises(ValueError, match="limit must be >= 1, got 0"):
        PendingFlushes(limit=0)
