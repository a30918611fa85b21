"""`DiarizerSession`'s state machine: every transition, legal and illegal, without a worker.

The worker's pipe is a recording stand-in (`Pipe`: what `WorkerSupervisor.send` would write);
the host is a real, unstarted `DiarizationEngine`. The worker's replies are the messages it
really sends (FRAMES, CLOSED), fed to the session as the engine routes them.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge.clock import FRAME_SAMPLES, AudioBlock
from edge.diarization.engine import MAX_INFLIGHT, DiarizationEngine
from edge.diarization.feed import SessionFeed
from edge.diarization.session import (
    DegradedCause,
    DiarizerSession,
    DiarizerState,
    InvalidDiarizerTransition,
)
from edge.diarization.wire import Kind
from edge.health import Status
from edge.metrics import Metrics
from tests.helpers.diarization import settings

S = DiarizerState
UNIT = 4 * FRAME_SAMPLES


class Pipe:
    """The worker's pipe: records every message the session sends; `ready` as the worker's."""

    def __init__(self) -> None:
        self.ready = True
        self.sent: list[tuple[Kind, dict[str, Any], Any]] = []

    def send(self, kind: Kind, meta: dict[str, Any] | None = None, array: Any = None) -> bool:
        self.sent.append((kind, dict(meta or {}), array))
        return True

    def kinds(self) -> list[Kind]:
        return [k for k, _, _ in self.sent]


@pytest.fixture
def engine(tmp_path: Path) -> DiarizationEngine:
    return DiarizationEngine(settings(tmp_path), Status(max_sessions=4), Metrics())


def make(engine: DiarizationEngine, pipe: Pipe, timeout_s: float = 10.0) -> DiarizerSession:
    return DiarizerSession("s", SessionFeed(unit_frames=4), pipe, engine,
                           timeout_s=timeout_s, max_inflight=MAX_INFLIGHT)


def audio(s: DiarizerSession, start: int, units: int) -> None:
    s.push(AudioBlock(start, (np.ones(units * UNIT) * 1000).astype("<i2").tobytes()))


async def settle() -> None:
    """Let the close task run up to its wait for the worker."""
    for _ in range(5):
        await asyncio.sleep(0)


def frames(n: int) -> np.ndarray:
    return np.full((n, 4), 0.9, np.float32)


def test_admit_opens_a_stream_and_sends_no_more_than_its_credit(engine: DiarizationEngine) -> None:
    pipe = Pipe()
    s = make(engine, pipe)
    assert s.state is S.UNAVAILABLE and not s.admitted
    s.wait("diarizer loading")
    s.admit("s/0")
    assert s.state == "active" and s.admitted and s.sid == "s/0"
    audio(s, 0, 5)
    assert pipe.kinds() == [Kind.OPEN] + [Kind.AUDIO] * MAX_INFLIGHT
    assert [m["seq"] for k, m, _ in pipe.sent if k is Kind.AUDIO] == [1, 2]
    placed, samples = s.on_frames(1, 0, frames(4), now=0.0)  # the answer to unit 1: credit
    assert (placed, samples) == (4, UNIT) and s.timeline.frames_end == 4
    assert pipe.kinds().count(Kind.AUDIO) == MAX_INFLIGHT + 1


def test_refused_session_drops_its_audio_until_admitted(engine: DiarizationEngine) -> None:
    pipe = Pipe()
    s = make(engine, pipe)
    s.refuse("local diarization at capacity: test")
    audio(s, 0, 3)
    assert s.state is S.REFUSED and s.feed.pending_samples == 0 and pipe.sent == []
    s.refuse("local diarization at capacity: still")  # stays refused, new reason
    s.wait("diarizer restarting")
    assert s.state is S.UNAVAILABLE and s.reason == "diarizer restarting"
    s.admit("s/1")
    assert s.state is S.ACTIVE


def test_a_timeout_degrades_and_an_answer_in_time_restores_labels(engine: DiarizationEngine) -> None:
    pipe = Pipe()
    s = make(engine, pipe, timeout_s=1.0)
    s.admit("s/0")
    audio(s, 0, 3)
    s.too_slow("diarizer step slower than 1 s")
    assert s.state is S.DEGRADED and s.cause is DegradedCause.TIMEOUT and s.sid == "s/0"
    sent = s.oldest_pending()
    assert sent is not None
    s.on_frames(1, 0, frames(4), now=sent + 5.0)  # unit 2 still unanswered, and late
    assert s.state is S.DEGRADED
    s.on_frames(2, 4, frames(4), now=sent + 0.5)  # everything answered in time
    assert s.state is S.ACTIVE and s.cause is None
    assert [st for st, _ in s.history] == [S.ACTIVE, S.DEGRADED, S.ACTIVE]


def test_a_lost_stream_degrades_until_a_new_stream_brings_frames(engine: DiarizationEngine) -> None:
    pipe = Pipe()
    s = make(engine, pipe)
    s.admit("s/0")
    audio(s, 0, 2)
    s.stream_lost(DegradedCause.ERROR, "diarizer step failed: test")
    assert s.state is S.DEGRADED and s.sid is None and s.admitted
    audio(s, 2 * UNIT, 2)  # kept in the backlog for the next stream, not sent
    assert pipe.kinds().count(Kind.AUDIO) == 2
    s.admit("s/1")
    assert s.state is S.DEGRADED and s.sid == "s/1"  # no labels until frames come
    assert pipe.sent[-MAX_INFLIGHT - 1][:2] == (Kind.OPEN, {"sid": "s/1"})
    s.on_frames(s.feed.last_seq, 0, frames(4), now=0.0)
    assert s.state is S.ACTIVE


def test_a_degraded_session_without_a_stream_can_be_refused(engine: DiarizationEngine) -> None:
    s = make(engine, Pipe())
    s.admit("s/0")
    s.stream_lost(DegradedCause.RESTART, "diarizer worker exited; restarting")
    s.refuse("local diarization at capacity: the new worker fits fewer")
    assert s.state is S.REFUSED and not s.admitted


@pytest.mark.parametrize(("setup", "transition"), [
    ([], lambda s: s.too_slow("x")),                               # UNAVAILABLE: not admitted
    ([], lambda s: s.stream_lost(DegradedCause.ERROR, "x")),       # no stream to lose
    ([], lambda s: s.on_closed(0, frames(1))),                     # not closing
    (["admit"], lambda s: s.admit("s/9")),                         # ACTIVE: has a stream
    (["admit"], lambda s: s.wait("x")),                            # ACTIVE never waits
    (["admit"], lambda s: s.refuse("x")),                          # ACTIVE keeps its slot
    (["admit", "slow"], lambda s: s.too_slow("x")),                # DEGRADED already
    (["admit", "slow"], lambda s: s.admit("s/9")),                 # DEGRADED with its stream
    (["admit", "slow"], lambda s: s.refuse("x")),                  # idem
    (["admit", "lost"], lambda s: s.stream_lost(DegradedCause.ERROR, "x")),  # lost already
    (["admit", "lost"], lambda s: s.on_closed(0, frames(1))),      # DEGRADED: not closing
    (["refuse"], lambda s: s.too_slow("x")),                       # REFUSED: no stream
    (["shut"], lambda s: s.shut()),                                # CLOSED is final
    (["shut"], lambda s: s.give_up("x")),
    (["shut"], lambda s: s.admit("s/9")),
    (["shut"], lambda s: s.wait("x")),
])
def test_an_illegal_transition_raises_and_changes_nothing(
    engine: DiarizationEngine, setup: list[str], transition: Any,
) -> None:
    pipe = Pipe()
    s = make(engine, pipe)
    steps = {"admit": lambda: s.admit("s/0"), "slow": lambda: s.too_slow("slow"),
             "refuse": lambda: s.refuse("full"), "shut": lambda: s.shut(),
             "lost": lambda: s.stream_lost(DegradedCause.RESTART, "gone")}
    for step in setup:
        steps[step]()
    before = (s.state, s.reason, s.sid, len(pipe.sent))
    with pytest.raises(InvalidDiarizerTransition) as err:
        transition(s)
    assert err.value.state is before[0] and err.value.session_id == "s"
    assert (s.state, s.reason, s.sid, len(pipe.sent)) == before


async def test_close_flushes_waits_for_the_last_frames_then_is_closed(engine: DiarizationEngine) -> None:
    pipe = Pipe()
    s = make(engine, pipe)
    s.admit("s/0")
    audio(s, 0, 1)
    s.push(AudioBlock(UNIT, (np.ones(FRAME_SAMPLES + 100) * 1000).astype("<i2").tobytes()))
    closing = asyncio.create_task(s.close())
    await settle()
    assert s.state is S.CLOSING and s.admitted
    assert pipe.kinds() == [Kind.OPEN, Kind.AUDIO, Kind.AUDIO, Kind.CLOSE]  # the remainder too
    audio(s, 10 * UNIT, 1)  # audio after close() is dropped
    assert pipe.kinds().count(Kind.AUDIO) == 2
    s.on_closed(0, frames(6))
    await closing
    assert s.state is S.CLOSED and s.sid is None and not s.admitted
    assert s.timeline.frames_end == 6
    await s.close()  # idempotent
    assert pipe.kinds().count(Kind.CLOSE) == 1


async def test_a_closing_session_keeps_waiting_for_labels_only_if_they_were_flowing(
    engine: DiarizationEngine,
) -> None:
    for degrade in (False, True):
        pipe = Pipe()
        s = make(engine, pipe)
        s.admit("s/0")
        audio(s, 0, 1)
        if degrade:
            s.too_slow("slow")
        closing = asyncio.create_task(s.close())
        await settle()
        waiter = asyncio.create_task(s.wait_covered(0.3, 5.0))
        await asyncio.sleep(0.01)
        assert waiter.done() is degrade  # a degraded one gives up at once
        s.on_closed(0, frames(4))
        assert await waiter is not degrade
        await closing


async def test_a_lost_worker_ends_a_close_at_once(engine: DiarizationEngine) -> None:
    pipe = Pipe()
    s = make(engine, pipe, timeout_s=30.0)
    s.admit("s/0")
    closing = asyncio.create_task(s.close())
    await settle()
    s.stream_lost(DegradedCause.RESTART, "worker exited")
    await asyncio.wait_for(closing, 1.0)  # not the 30 s close timeout
    assert s.state is S.CLOSED


def test_give_up_ends_the_stream_and_tells_the_worker(engine: DiarizationEngine) -> None:
    pipe = Pipe()
    s = make(engine, pipe)
    s.admit("s/0")
    audio(s, 0, 1)
    s.give_up("model broken")
    assert s.state is S.UNAVAILABLE and s.reason == "model broken" and s.sid is None
    assert pipe.sent[-1][:2] == (Kind.CLOSE, {"sid": "s/0"})
    audio(s, UNIT, 1)
    assert s.feed.pending_samples == 0
