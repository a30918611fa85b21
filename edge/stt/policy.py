"""What a call's end means for the next one, sans I/O: the retry policy of an upstream run.

`StreamRun` (edge/stt/stream.py) opens one call after another. How a call ended (`CallEnd`,
carried by an `Outcome`) decides, here and nowhere else, why the next call opens (its
`cause`, counted in the `edge_upstream_restarts_total` metric), whether it first holds its
audio back (`probe`), how long to wait before it (backoff after failures in a row), and when
to stop (a fatal error, or the audio ended and Google stayed unreachable for `end_timeout_s`).
`CallState` is the life of one call, shared by its request generator and its reader;
`PendingFlushes` the FLUSHes a run has yet to answer. `RotationPolicy` says when a call is
rotated before Google's per-call limit, `Backoff` how long to wait before reconnecting.

Nothing here has a socket, a task or a clock: times come in as arguments, so every decision
is unit-tested without a server (tests/test_stt_policy.py).
"""

from __future__ import annotations

import enum
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field


# --- when to rotate, how long to wait -------------------------------------------------------
@dataclass(frozen=True)
class RotationPolicy:
    """Rotate a call before Google's per-call limit.

    A call's age is the larger of the audio it was sent and the wall time it has been open:
    for a live stream the two agree; when the session stalls, wall time still ends the call in
    time (Google's limit is on wall time); when audio is replayed or fed faster than real time
    (tests), audio time does. Past `rotate_s - quiet_s`, the next final result is a quiet
    moment (an utterance just ended): rotate then. At `rotate_s`, rotate whatever is going on.
    """

    rotate_s: float
    quiet_s: float

    @classmethod
    def for_limit(cls, rotate_s: float) -> RotationPolicy:
        return cls(rotate_s=rotate_s, quiet_s=min(30.0, rotate_s / 5))

    def due(self, audio_s: float, wall_s: float, *, after_final: bool) -> bool:
        age = max(audio_s, wall_s)
        return age >= self.rotate_s or (after_final and age >= self.rotate_s - self.quiet_s)


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter ("equal jitter": half fixed, half random)."""

    initial: float = 0.25
    maximum: float = 8.0
    multiplier: float = 2.0

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait before reconnect number `attempt` (1-based)."""
        cap = min(self.maximum, self.initial * self.multiplier ** max(0, attempt - 1))
        return cap / 2 + rand() * cap / 2


# Why a call was cut or half-closed to start the next one (a metric label too).
ROTATE = "rotate"
# Pending FLUSHes kept apart; beyond it a FLUSH joins the newest (each FLUSH half-closes a call).
MAX_PENDING_FLUSHES = 4


class CallEnd(enum.Enum):
    """How a call ended. The last four are `Api.classify`'s names for a failed call."""

    CLEAN = "clean"  # we half-closed and Google answered everything it was sent
    CUT = "cut"  # we cancelled it: a rotation, or a drain that took too long
    CLOSED = "closed"  # the server ended it without our half-close
    LIMIT = "limit"  # Google's per-call duration limit: "start a new stream"
    RETRY = "retry"  # a retryable error: reconnect after backoff
    UNCLEAR = "unclear"  # INTERNAL: retried, but it may hide a refused config
    FATAL = "fatal"  # no point reconnecting: the run ends with an error


@dataclass(frozen=True)
class Outcome:
    """How one call ended: `kind`, and the `cause` of a cut or clean end, or the `error`."""

    kind: CallEnd
    cause: str | None = None
    error: BaseException | None = None


class CallState(enum.IntEnum):
    """One call's life. Only forward: OPEN -> CLOSING -> HALF_CLOSED -> FINISHED, where
    OPEN may go straight to HALF_CLOSED (a FLUSH or the end of the audio) and any state to
    FINISHED (the supervisor is done with the call)."""

    OPEN = 0  # the request generator sends audio
    CLOSING = 1  # a half-close was asked: the generator stops at its next chance
    HALF_CLOSED = 2  # every request is sent; Google answers the rest
    FINISHED = 3  # the call is over; its generator returns


_NEXT: dict[CallState, frozenset[CallState]] = {
    CallState.OPEN: frozenset({CallState.CLOSING, CallState.HALF_CLOSED, CallState.FINISHED}),
    CallState.CLOSING: frozenset({CallState.HALF_CLOSED, CallState.FINISHED}),
    CallState.HALF_CLOSED: frozenset({CallState.FINISHED}),
    CallState.FINISHED: frozenset(),
}


def check_transition(old: CallState, new: CallState) -> CallState:
    """Returns `new` when a call may go from `old` to it; raises `RuntimeError` otherwise."""
    if new not in _NEXT[old]:
        raise RuntimeError(f"a call cannot go from {old.name} to {new.name}")
    return new


@dataclass(frozen=True)
class Decision:
    """What to do after a call: `stop` the run (fatal), else open the next call after
    `wait_s` seconds; `failed` says the call counts as a failure (report it)."""

    wait_s: float = 0.0
    failed: bool = False
    stop: bool = False


@dataclass
class RetryPolicy:
    """The decisions between one run's calls (see the module docstring).

    Failures in a row (`failures`) grow the backoff; a call that got any response, ended
    clean or was cut to rotate ends the streak. Two calls in a row that failed with
    INTERNAL right away (no response, within 2 x `probe_s`) make the next call a `probe`:
    it sends its config alone for `probe_s` before the audio, so a config the service
    refuses fails with its true status (grpc.aio replaces it with INTERNAL when it races a
    write, grpc/grpc#36066; one such failure is usually a transient error and does not pay
    the wait).
    """

    backoff: Backoff
    probe_s: float
    end_timeout_s: float
    rand: Callable[[], float] = field(default=random.random, repr=False)
    cause: str | None = None  # why the next call opens (None: the first call)
    probe: bool = False  # the next call holds its audio back for `probe_s`
    failures: int = 0  # calls failed in a row
    unclear: int = 0  # of which the last ones were INTERNAL right at the start
    ended_at: float | None = None  # when the run first saw the audio ended with work left

    def give_up(self, now: float, *, ended: bool) -> bool:
        """Asked before each call with work pending. True when the audio has ended and
        calls have kept failing for more than `end_timeout_s` since that was first seen."""
        if not ended:
            return False
        if self.ended_at is None:
            self.ended_at = now
        return self.failures > 0 and now - self.ended_at > self.end_timeout_s

    def after(self, outcome: Outcome, *, responded: bool, age_s: float) -> Decision:
        """Record how a call ended; returns what to do next. `responded`: the call got at
        least one response; `age_s`: seconds from its opening to its end."""
        kind = outcome.kind
        if responded or kind is CallEnd.CLEAN or outcome.cause == ROTATE:
            self.failures = self.unclear = 0  # it worked: the next failure starts a new streak
        self.probe = False
        if kind is CallEnd.FATAL:
            return Decision(failed=True, stop=True)
        if kind is CallEnd.CLEAN or (kind is CallEnd.CUT and outcome.cause == ROTATE):
            self.cause = outcome.cause
            return Decision()
        self.failures += 1
        at_start = not responded and age_s < 2 * self.probe_s
        self.unclear = self.unclear + 1 if kind is CallEnd.UNCLEAR and at_start else 0
        self.probe = self.unclear >= 2
        self.cause = "limit" if kind is CallEnd.LIMIT else "error"
        if kind is CallEnd.LIMIT and self.failures == 1:
            return Decision(failed=True)  # "start a new stream": at once, the first time
        return Decision(wait_s=self.backoff.delay(self.failures, self.rand), failed=True)


class PendingFlushes:
    """FLUSHes not answered yet, oldest first, each as [session sample, how many FLUSHes it
    answers]. A FLUSH with no audio since the newest one, or one past `limit`, joins the
    newest (whose sample moves up to the audio's end): each still gets its answer, but no
    extra call is half-closed for it. Bounded by `limit` entries."""

    def __init__(self, limit: int = MAX_PENDING_FLUSHES) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self.limit = limit
        self._entries: deque[list[int]] = deque()

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, end: int) -> None:
        """A FLUSH arrived when the session's audio reached sample `end`."""
        newest = self._entries[-1] if self._entries else None
        if newest is not None and (newest[0] == end or len(self._entries) >= self.limit):
            newest[0] = end
            newest[1] += 1
        else:
            self._entries.append([end, 1])

    @property
    def first(self) -> int | None:
        """The sample the oldest pending FLUSH waits for (None: none pending)."""
        return self._entries[0][0] if self._entries else None

    def answer(self, unfinalized: int | None) -> list[int]:
        """Take every FLUSH with no unfinalized audio before it: all of them when
        `unfinalized` (the first sample not yet covered by a final) is None. Returns one
        session sample per FLUSH answered, oldest first."""
        answered: list[int] = []
        while self._entries and (unfinalized is None or unfinalized >= self._entries[0][0]):
            sample, count = self._entries.popleft()
            answered.extend([sample] * count)
        return answered


__all__ = ["MAX_PENDING_FLUSHES", "ROTATE", "Backoff", "CallEnd", "CallState", "Decision", "Outcome",
           "PendingFlushes", "RetryPolicy", "RotationPolicy", "check_transition"]
