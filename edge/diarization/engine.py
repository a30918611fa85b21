"""The daemon side of local diarization: sessions, admission, routing, timeouts.

Use (from the app and the session code; nothing here blocks the event loop):

    engine = DiarizationEngine(settings, status, metrics)
    engine.availability                # decided once: can a worker run here at all?
    await engine.start()               # after READY=1: spawns the worker, loads in background
    s = engine.open_session(id)        # never raises; s.state says what it will get
    s.push(block); await s.wait_covered(t, timeout); s.timeline.speaker_for(a, b)
    await s.close(); await engine.close()
    engine.healthy()                   # for the systemd watchdog

The worker process itself is kept alive by `WorkerSupervisor` (supervisor.py: restarts,
backoff, memory and exit detection). State (`EngineState`, owned here, transitions checked by
`_become`): NEW -> LOADING (status `progress`: import, download %, load, warmup) -> READY |
UNAVAILABLE (NeMo missing, model missing or broken, does not fit the budget, worker unable to
start) or DISABLED (switched off); DEGRADED while the worker restarts (the published state is
also "degraded" while a session is). Transcripts never depend on any of it.

Budget and compute limits: admission.py (`Capacity`). Beyond capacity a session is refused
(the reason names the limit) and is admitted, in opening order, when a slot frees.
RSS is enforced by polling (supervisor.py), not RLIMIT_AS/RLIMIT_DATA: torch and CUDA reserve far
more address space than they use, so such a limit breaks loading rather than catching leaks;
the unit's MemoryMax stays the last line.

Timeouts: a session whose oldest unanswered message is older than
STT_NEMO_DIARIZATION_TIMEOUT_S is "degraded" (labels null) until the worker answers in time
again; a worker silent for STUCK_FACTOR (3) times that with work outstanding is killed ("stuck")
and restarted. After any restart, admitted sessions open new streams: labels come back, and
the new stream's speakers get new numbers (it knows nothing of earlier voices). A failed
step drops only that stream, which reopens at once; 3 failures within 60 s restart the worker.

Flow control: each session has at most MAX_INFLIGHT units (0.32 s each) in the worker's pipe;
the rest waits in its bounded backlog (catch-up policy: feed.py). Metrics: step latency, RTF
(worker compute / audio over the last 30 s), restarts by cause, worker RSS, queue depth (80 ms
frames waiting, all sessions) and drops (frames skipped).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from enum import StrEnum
from typing import Any

from edge.clock import FRAME_SAMPLES, SAMPLE_RATE
from edge.device import MB
from edge.diarization import wire
from edge.diarization.admission import Availability, Capacity, decide_availability, nemo_check
from edge.diarization.feed import SessionFeed
from edge.diarization.report import EngineReport
from edge.diarization.session import DegradedCause, DiarizerSession, DiarizerState
from edge.diarization.supervisor import WorkerSupervisor
from edge.diarization.wire import Kind
from edge.health import Status
from edge.metrics import Metrics
from edge.settings import Settings

log = logging.getLogger("edge.diarization")

TICK_S = 0.25
STUCK_FACTOR = 3.0
MAX_INFLIGHT = 2
UNIT_FRAMES = 4
ERRORS_WINDOW_S, ERRORS_MAX = 60.0, 3
LIVE_RTF_MIN_STEPS = 8  # live steps needed before their RTF replaces the warm-up's


class EngineState(StrEnum):
    """The engine's state; the values are the status channel's words."""

    NEW = "new"  # start() not called yet
    LOADING = "loading"
    READY = "ready"
    DEGRADED = "degraded"  # the worker was lost; a new one is on its way
    DISABLED = "disabled"  # switched off: for good
    UNAVAILABLE = "unavailable"  # cannot run: for good
    CLOSED = "closed"


E = EngineState
FINAL = frozenset({E.DISABLED, E.UNAVAILABLE})
# From each state, the states it may go to (`_become` checks).
TRANSITIONS: dict[EngineState, frozenset[EngineState]] = {
    E.NEW: frozenset({E.LOADING, E.DISABLED, E.UNAVAILABLE, E.CLOSED}),
    E.LOADING: frozenset({E.READY, E.DEGRADED, E.UNAVAILABLE, E.CLOSED}),
    E.READY: frozenset({E.DEGRADED, E.UNAVAILABLE, E.CLOSED}),
    E.DEGRADED: frozenset({E.READY, E.DEGRADED, E.UNAVAILABLE, E.CLOSED}),
    E.DISABLED: frozenset(),
    E.UNAVAILABLE: frozenset(),
    E.CLOSED: frozenset(),
}


class InvalidEngineTransition(RuntimeError):
    """An engine transition its state does not allow (a bug of ours)."""

    def __init__(self, state: EngineState, to: EngineState) -> None:
        super().__init__(f"diarization engine: cannot go from {state} to {to}")
        self.state, self.to = state, to


class DiarizationEngine:
    """Owns every session's diarizer state and the worker's supervisor (module docstring)."""

    def __init__(self, settings: Settings, status: Status, metrics: Metrics) -> None:
        self.settings, self.status, self.metrics = settings, status, metrics
        self.availability: Availability = decide_availability(settings)
        self.reason: str | None = None
        self.worker = WorkerSupervisor(settings, metrics, self)
        self.budget = self.worker.budget
        self.admission = Capacity(self.budget, settings.edge_diarization_session_mb,
                                  settings.edge_diarization_max_rtf)
        self._state = E.NEW
        self._sessions: list[DiarizerSession] = []
        self._streams: dict[str, DiarizerSession] = {}
        self._stream_no = itertools.count()
        self._errors: deque[float] = deque(maxlen=ERRORS_MAX)
        self.report = EngineReport(status, metrics)
        self._tasks: list[asyncio.Task[None]] = []
        self._last_tick = time.monotonic()

    @property
    def state(self) -> EngineState:
        return self._state

    @property
    def figures(self) -> dict[str, Any]:
        """The worker's READY measurements and the admission figures derived from them."""
        return self.admission.figures

    @property
    def capacity(self) -> int:
        return self.admission.sessions

    # --- lifecycle ---
    async def start(self) -> None:
        """Spawn the worker and load the model in the background; returns promptly."""
        if self._state is not E.NEW:
            return
        a = self.availability
        if a.state != "available":
            self._finalize(E.DISABLED if a.state == "disabled" else E.UNAVAILABLE, str(a.reason))
            return
        self._become(E.LOADING, "starting the worker")
        self.status.set_check("nemo", "loading")
        self._tasks = [self.worker.start(), asyncio.create_task(self._tick_loop(), name="diarizer-tick")]

    async def close(self) -> None:
        """Stop the worker (SHUTDOWN, killed after 5 s) and end every session's diarization."""
        if self._state not in FINAL and self._state is not E.CLOSED:
            self._become(E.CLOSED, "diarizer shut down")
        for s in list(self._sessions):
            self._release(s, tell_worker=False)
        await self.worker.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def healthy(self) -> bool:
        """For the watchdog: the supervisor is alive and the engine's tick ran in the last 5 s.

        True while the worker loads, restarts or is unavailable (transcripts still flow);
        False only if the supervisor itself died or is wedged.
        """
        if not self._tasks or self._state is E.CLOSED:
            return True
        supervisor, tick = self._tasks
        if tick.done() or (supervisor.done() and not self.final):
            return False
        return time.monotonic() - self._last_tick < 5.0

    @property
    def final(self) -> bool:
        """True once local diarization is off or unavailable for good (not just loading)."""
        return self._state in FINAL

    @property
    def worker_pid(self) -> int | None:
        return self.worker.pid

    @property
    def restarts(self) -> int:
        return self.worker.restarts

    def open_session(self, session_id: str) -> DiarizerSession:
        """A diarizer for one client session. Never raises: a session that cannot be served
        now says why in `state`/`reason` (edge/diarization/session.py lists the states)."""
        feed = SessionFeed(unit_frames=UNIT_FRAMES, keep_s=2.0,
                           max_backlog_s=self.settings.edge_diarization_max_backlog_s)
        s = DiarizerSession(session_id, feed, self.worker, self,
                            timeout_s=self.settings.stt_nemo_diarization_timeout_s,
                            max_inflight=MAX_INFLIGHT)
        if self._state is E.CLOSED or self.final:
            s.wait(self.reason if self.final else "diarizer shut down")
            return s
        self._sessions.append(s)
        if not self.worker.ready:
            waiting = "diarizer restarting" if self._state is E.DEGRADED else "diarizer loading"
            s.wait(waiting)  # admitted when the worker is ready
        else:
            self._admit(s)
        self._publish()
        return s

    # --- what the sessions report (`session.Host`) ---
    def skipped(self, s: DiarizerSession, frames: int) -> None:
        """Session `s` skipped `frames` of audio (catch-up): counted, and told once."""
        self.metrics.queue_dropped.labels("diarizer").inc(frames)
        if s.feed.skipped_frames == frames:  # its first skip: the metric counts the rest
            self.status.notice("diarizer", f"session {s.id}: behind real time, skipped "
                                           f"{frames * FRAME_SAMPLES / SAMPLE_RATE:.1f} s of audio")

    def release(self, s: DiarizerSession) -> None:
        """Session `s` finished closing: free its slot for a waiting session."""
        self._release(s, tell_worker=self._state is not E.CLOSED)

    # --- what the supervisor reports ---
    def on_ready(self, fig: dict[str, Any]) -> None:
        if self._state is E.CLOSED or self.final:
            return
        too_big = self.admission.measured(fig)  # admitted sessions reopen first, below
        if too_big is not None:
            self.worker.give_up(too_big)
            return
        self._become(E.READY, None)
        self.status.set_check("nemo", "ok")
        f = self.figures
        runtime = " ".join(str(fig[k]) for k in ("runtime", "precision") if fig.get(k))
        log.info("diarizer ready (%s) on %s: model %d MB, step peak %d MB, step %.3f s (RTF %.3f): "
                 "%d session(s) fit %d MB, %d keep up in real time", runtime or "nemo", fig["device"],
                 fig["model_rss"] // MB, fig["step_peak"] // MB, fig["step_s"], fig["rtf"],
                 f["memory_capacity"], self.budget // MB, f["compute_capacity"])
        # Sessions that held a slot get a new stream first; then the waiting ones, in order.
        for s in sorted(self._sessions, key=lambda s: not s.admitted):
            self._admit(s)
        self._publish()

    def on_lost(self, reason: str) -> None:
        if self._state is E.CLOSED or self.final:
            return
        self.status.notice("diarizer", f"{reason}; restarting")
        for s in self._streams.values():
            s.stream_lost(DegradedCause.RESTART, f"diarizer {reason}; restarting")
        self._streams.clear()
        for s in self._sessions:
            if s.state in (DiarizerState.UNAVAILABLE, DiarizerState.REFUSED):
                s.wait("diarizer restarting")
        self._become(E.DEGRADED, f"{reason}; restarting")

    def on_final(self, reason: str) -> None:
        if self._state is not E.CLOSED and not self.final:
            self._finalize(E.UNAVAILABLE, reason)

    def on_progress(self) -> None:
        self._publish()

    def on_message(self, msg: wire.Message) -> None:
        m = msg.meta
        if msg.kind is Kind.FRAMES:
            s = self._streams.get(m["sid"])
            if s is not None:  # else a stream dropped meanwhile
                now = time.monotonic()
                n, samples = s.on_frames(m["seq"], m["first"], msg.array, now)
                self.report.step(now, m["compute_s"], samples / SAMPLE_RATE, n)
        elif msg.kind is Kind.CLOSED:
            s = self._streams.pop(m["sid"], None)
            if s is not None:
                s.on_closed(m["first"], msg.array)
        elif msg.kind is Kind.ERROR:
            self._on_error(m["sid"], m["reason"])
        elif msg.kind is Kind.STATS_REPLY:
            self.figures["stats"] = m
            if m.get("rtf") and m["recent_steps"] >= LIVE_RTF_MIN_STEPS and self.admission.rtf(m["rtf"]):
                self._admit_waiting()

    def _finalize(self, state: EngineState, reason: str) -> None:
        """Unavailable (or disabled) for good: every session is told why."""
        self._become(state, reason)
        self.status.set_check("nemo", "disabled" if state is E.DISABLED else nemo_check(reason))
        if state is not E.DISABLED:  # seed contract: no message when the fallback is switched off
            log.warning("local diarization %s: %s", state, reason)
        for s in list(self._sessions):
            if s.sid is not None:
                self._streams.pop(s.sid, None)
            s.give_up(reason)
        self._publish()

    # --- sessions ---
    def _admit(self, s: DiarizerSession) -> None:
        """Open a stream for `s` if a slot is free, else refuse it (a no-op for a session that
        has a stream, or is closing)."""
        if s.sid is not None or s.state in (DiarizerState.CLOSING, DiarizerState.CLOSED):
            return
        # Slots in use are the streams already open (after a restart, admitted sessions
        # reopen first; if the new worker fits fewer, the last ones are refused).
        if sum(x.sid is not None for x in self._sessions) < self.capacity:
            self._open_stream(s)
        else:
            s.refuse(self.admission.refusal())

    def _admit_waiting(self) -> None:
        """A slot freed (or capacity grew): refused sessions get it, in opening order."""
        if self.worker.ready and self._state is not E.CLOSED:
            for waiting in self._sessions:
                if waiting.state is DiarizerState.REFUSED:
                    self._admit(waiting)

    def _open_stream(self, s: DiarizerSession) -> None:
        sid = f"{s.id}/{next(self._stream_no)}"
        self._streams[sid] = s
        s.admit(sid)

    def _on_error(self, sid: str, reason: str) -> None:
        s = self._streams.pop(sid, None)
        if s is None:
            return
        now = time.monotonic()
        self._errors.append(now)
        log.warning("diarizer step failed for session %s: %s", s.id, reason)
        self.status.notice("diarizer", f"session {s.id}: step failed ({reason}); new stream")
        s.stream_lost(DegradedCause.ERROR, f"diarizer step failed: {reason}")
        if s.state is DiarizerState.CLOSING:
            return
        if len(self._errors) == ERRORS_MAX and now - self._errors[0] < ERRORS_WINDOW_S:
            self._errors.clear()
            self.worker.kill("errors")
        elif self.worker.ready:
            self._open_stream(s)

    def _release(self, s: DiarizerSession, tell_worker: bool) -> None:
        """End a session's use of the worker (CLOSED) and free its slot for a waiting one."""
        if s.sid is not None:
            self._streams.pop(s.sid, None)
        freed = s.admitted
        if s.state is not DiarizerState.CLOSED:
            s.shut(tell_worker=tell_worker)
        if s in self._sessions:
            self._sessions.remove(s)
        if freed:
            self._admit_waiting()
        self._publish()

    # --- housekeeping: one tick ---
    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            self._last_tick = time.monotonic()
            try:
                self._tick(self._last_tick)
            except Exception:  # housekeeping must keep ticking; the watchdog depends on it
                log.exception("diarizer tick failed")

    def _tick(self, now: float) -> None:
        timeout = self.settings.stt_nemo_diarization_timeout_s
        if self.worker.ready:
            oldest = None
            for s in list(self._streams.values()):
                sent = s.oldest_pending()
                if sent is None:
                    continue
                oldest = sent if oldest is None else min(oldest, sent)
                if now - sent > timeout and s.state is DiarizerState.ACTIVE:
                    s.too_slow(f"diarizer step slower than {timeout:g} s")
                    self.status.notice("diarizer", f"session {s.id}: step slower than {timeout:g} s")
            stuck_after = STUCK_FACTOR * timeout
            if oldest is not None and now - oldest > stuck_after and now - self.worker.last_msg > stuck_after:
                log.error("diarizer worker silent for %.1f s with work outstanding",
                          now - self.worker.last_msg)
                self.worker.kill("stuck")
        self.worker.poll(now)
        self._publish()

    def _publish(self) -> None:
        public = self._state not in (E.NEW, E.CLOSED)  # not status words: the status keeps its last
        self.report.publish(
            state=str(self._state) if public else None, reason=self.reason, sessions=self._sessions,
            rss=self.worker.rss, progress=self.worker.progress, figures=self.figures,
            memory_budget_mb=self.budget // MB, capacity=self.capacity, restarts=self.restarts)

    def _become(self, state: EngineState, reason: str | None) -> None:
        """The one place the engine's state changes: checks the state it leaves."""
        if state not in TRANSITIONS[self._state]:
            raise InvalidEngineTransition(self._state, state)
        self._state, self.reason = state, reason
        self._publish()


__all__ = ["DiarizationEngine", "DiarizerSession", "EngineState", "InvalidEngineTransition"]
