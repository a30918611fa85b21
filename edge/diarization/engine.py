"""The daemon side of local diarization: sessions, admission, routing, timeouts.

Use (from the app and the session code; nothing here blocks the event loop):

    engine = DiarizationEngine(settings, status, metrics)
    await engine.start()               # after READY=1: spawns the worker, loads in background
    s = engine.open_session(id)        # never raises; s.state says what it will get
    s.push(block); await s.wait_covered(t, timeout); s.timeline.speaker_for(a, b)
    await s.close(); await engine.close()
    engine.healthy()                   # for the systemd watchdog

The worker process itself is kept alive by `WorkerSupervisor` (supervisor.py: restarts,
backoff, memory and exit detection). State: "loading" (status `progress`: import, download %,
load, warmup) -> "ready" | "unavailable" (fallback off, NeMo missing, model missing or broken,
does not fit the budget, worker unable to start); "degraded" while the worker restarts or a
session is degraded. Transcripts never depend on any of it.

Budget (EDGE_DIARIZATION_MEMORY_MB): the worker measures at load its RSS with the model, one
warm-up session's state, the RSS peak of its warm-up steps (`step_peak`) and their time (RTF).
Sessions are admitted while `model + step_peak + n * per_session <= budget`, per_session =
max(measured state, EDGE_DIARIZATION_SESSION_MB), and while `n * RTF <=
EDGE_DIARIZATION_MAX_RTF` (0.9; one worker steps every session in turn: past that all would
fall behind; RTF from warm-up, then live). Beyond that a session is "refused" (the reason names
the limit) and is admitted, in opening order, when a slot frees.
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
import contextlib
import itertools
import logging
import time
from collections import deque
from typing import Any

import numpy as np

from edge.clock import FRAME_SAMPLES, SAMPLE_RATE, overlap
from edge.diarization import wire, worker_runtime_available
from edge.diarization.feed import SessionFeed
from edge.diarization.session import DiarizerSession
from edge.diarization.supervisor import WorkerSupervisor
from edge.diarization.wire import Kind
from edge.health import Status
from edge.metrics import Metrics
from edge.plan import local_diarizer_used
from edge.settings import Settings

log = logging.getLogger("edge.diarization")

MB = 2**20
TICK_S = 0.25
STUCK_FACTOR = 3.0
MAX_INFLIGHT = 2
UNIT_FRAMES = 4
ERRORS_WINDOW_S, ERRORS_MAX = 60.0, 3
VOLATILE_EVERY_S = 5.0
LIVE_RTF_MIN_STEPS = 8  # live steps needed before their RTF replaces the warm-up's


class DiarizationEngine:
    """Owns every session's diarizer state and the worker's supervisor (module docstring)."""

    def __init__(self, settings: Settings, status: Status, metrics: Metrics) -> None:
        self.settings, self.status, self.metrics = settings, status, metrics
        self.state = "disabled"
        self.reason: str | None = None
        self.figures: dict[str, Any] = {}  # the worker's READY measurements
        self.capacity = 0
        self.worker = WorkerSupervisor(settings, metrics, self)
        self.budget = self.worker.budget
        self._final = False  # unavailable for good
        self._closing = False
        self._sessions: list[DiarizerSession] = []
        self._streams: dict[str, DiarizerSession] = {}
        self._stream_no = itertools.count()
        self._errors: deque[float] = deque(maxlen=ERRORS_MAX)
        self._work: deque[tuple[float, float, float]] = deque(maxlen=1024)  # (t, compute, audio)
        self._tasks: list[asyncio.Task[None]] = []
        self._last_tick = time.monotonic()
        self._volatile_at = 0.0
        self._volatile: dict[str, Any] = {"rtf": None, "memory_used_mb": None}

    # --- lifecycle ---
    async def start(self) -> None:
        """Spawn the worker and load the model in the background; returns promptly."""
        if self._tasks or self._final:
            return
        if not self.settings.stt_enable_nemo_diarization_fallback:
            self._finalize("disabled", "local diarization is off (STT_ENABLE_NEMO_DIARIZATION_FALLBACK)")
            return
        if not local_diarizer_used(self.settings):  # the session plan never opens one
            self._finalize("disabled", "local diarization is off "
                           f"(EDGE_STT_DIARIZATION={self.settings.edge_stt_diarization})")
            return
        ok, err = worker_runtime_available(self.settings.edge_diarization_runtime)
        if not ok:
            self._finalize("unavailable", str(err))
            return
        self._set_state("loading", "starting the worker")
        self.status.set_check("nemo", "loading")
        self._tasks = [self.worker.start(), asyncio.create_task(self._tick_loop(), name="diarizer-tick")]

    async def close(self) -> None:
        """Stop the worker (SHUTDOWN, killed after 5 s) and end every session's diarization."""
        self._closing = True
        for s in list(self._sessions):
            self._release(s, "closed", None)
        await self.worker.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def healthy(self) -> bool:
        """For the watchdog: the supervisor is alive and the engine's tick ran in the last 5 s.

        True while the worker loads, restarts or is unavailable (transcripts still flow);
        False only if the supervisor itself died or is wedged.
        """
        if not self._tasks or self._closing:
            return True
        supervisor, tick = self._tasks
        if tick.done() or (supervisor.done() and not self._final):
            return False
        return time.monotonic() - self._last_tick < 5.0

    @property
    def final(self) -> bool:
        """True once local diarization is off or unavailable for good (not just loading)."""
        return self._final

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
        s = DiarizerSession(self, session_id, feed)
        if self._closing or self._final:
            s.set_state("unavailable", self.reason if self._final else "diarizer shut down")
            return s
        self._sessions.append(s)
        if not self.worker.ready:
            waiting = "diarizer loading" if self.state == "loading" else "diarizer restarting"
            s.set_state("unavailable", waiting)  # admitted when the worker is ready
        else:
            self._admit(s)
        self._publish()
        return s

    # --- what the supervisor reports ---
    def on_ready(self, fig: dict[str, Any]) -> None:
        self.figures = dict(fig)
        per_session = max(int(fig["session_bytes"]), self.settings.edge_diarization_session_mb * MB)
        fixed = int(fig["model_rss"]) + int(fig["step_peak"])
        memory = max(0, (self.budget - fixed) // per_session)
        self.figures.update(per_session=per_session, memory_capacity=memory)
        self._set_capacity(fig["rtf"], admit=False)  # admitted sessions reopen first, below
        if memory == 0:
            self.worker.give_up(
                f"model needs {fixed // MB} MB + {per_session // MB} MB per session: "
                f"EDGE_DIARIZATION_MEMORY_MB={self.budget // MB} fits no session")
            return
        self._set_state("ready", None)
        self.status.set_check("nemo", "ok")
        runtime = " ".join(str(fig[k]) for k in ("runtime", "precision") if fig.get(k))
        log.info("diarizer ready (%s) on %s: model %d MB, step peak %d MB, step %.3f s (RTF %.3f): "
                 "%d session(s) fit %d MB, %d keep up in real time", runtime or "nemo", fig["device"],
                 fig["model_rss"] // MB,
                 fig["step_peak"] // MB, fig["step_s"], fig["rtf"], memory, self.budget // MB,
                 self.figures["compute_capacity"])
        # Sessions that held a slot get a new stream first; then the waiting ones, in order.
        for s in sorted(self._sessions, key=lambda s: not s.admitted):
            self._admit(s)
        self._publish()

    def on_lost(self, reason: str) -> None:
        self.status.notice("diarizer", f"{reason}; restarting")
        for s in self._streams.values():
            s.sid = None
            s.inflight.clear()
            if s.close_done is not None and not s.close_done.done():
                s.close_done.set_result(None)
            elif s.admitted:
                s.set_state("degraded", f"diarizer {reason}; restarting", cause="restart")
        self._streams.clear()
        for s in self._sessions:
            if not s.admitted:
                s.set_state("unavailable", "diarizer restarting")
        self._set_state("degraded", f"{reason}; restarting")

    def on_final(self, reason: str) -> None:
        self._finalize("unavailable", reason)

    def on_progress(self) -> None:
        self._publish()

    def on_message(self, msg: wire.Message) -> None:
        m = msg.meta
        if msg.kind is Kind.FRAMES:
            self._on_frames(m, msg.array)
        elif msg.kind is Kind.CLOSED:
            s = self._streams.pop(m["sid"], None)
            if s is not None:
                s.sid = None
                self._place(s, m["first"], msg.array)
                if s.close_done is not None and not s.close_done.done():
                    s.close_done.set_result(None)
        elif msg.kind is Kind.ERROR:
            self._on_error(m["sid"], m["reason"])
        elif msg.kind is Kind.STATS_REPLY:
            self.figures["stats"] = m
            if m.get("rtf") and m["recent_steps"] >= LIVE_RTF_MIN_STEPS:
                self._set_capacity(m["rtf"])

    def _set_capacity(self, rtf: float, admit: bool = True) -> None:
        """Capacity = min(memory, compute). One worker steps every session in turn: more
        sessions than it can step in real time would all fall behind (and skip audio). The RTF
        is the warm-up's at first, then the live one (STATS, every 10 s), so a device that was
        merely busy during warm-up admits more later. Admitted sessions are never evicted."""
        f, target = self.figures, self.settings.edge_diarization_max_rtf
        compute = max(1, int(target / rtf)) if rtf > 0 and target > 0 else f["memory_capacity"]
        f.update(compute_capacity=compute, rtf_estimate=round(rtf, 4))
        before, self.capacity = self.capacity, min(f["memory_capacity"], compute)
        if admit and self.capacity > before and self.worker.ready:
            for s in self._sessions:
                if s.state == "refused":
                    self._admit(s)

    def _finalize(self, state: str, reason: str) -> None:
        """Unavailable (or disabled) for good: every session is told why."""
        self._final = True
        self._set_state(state, reason)
        self.status.set_check("nemo", "disabled" if state == "disabled" else (
            reason if reason.startswith("NeMo not available") else f"NeMo not available: {reason}"))
        if state != "disabled":  # seed contract: no message when the fallback is switched off
            log.warning("local diarization %s: %s", state, reason)
        for s in list(self._sessions):
            self._release(s, "unavailable", reason)

    # --- sessions ---
    def _admit(self, s: DiarizerSession) -> None:
        if s.closing or s.sid is not None:
            return
        # Slots in use are the streams already open (after a restart, admitted sessions
        # reopen first; if the new worker fits fewer, the last ones are refused).
        if sum(x.sid is not None for x in self._sessions) < self.capacity:
            s.admitted = True
            self._open_stream(s)
            if s.state != "degraded":
                s.set_state("active", None)
            return
        s.admitted = False
        s.feed.stop()
        f = self.figures
        if f["memory_capacity"] <= f["compute_capacity"]:
            why = (f"{self.capacity} session(s) of {f['per_session'] // MB} MB fit "
                   f"EDGE_DIARIZATION_MEMORY_MB={self.budget // MB}")
        else:
            why = (f"{self.capacity} session(s) keep up in real time on {f['device']} "
                   f"(RTF {f['rtf_estimate']:.3f} per session)")
        s.set_state("refused", f"local diarization at capacity: {why}")

    def _open_stream(self, s: DiarizerSession) -> None:
        s.sid = f"{s.id}/{next(self._stream_no)}"
        self._streams[s.sid] = s
        s.inflight.clear()
        s.feed.start_stream()
        # A new stream: its slots name nobody known yet, and audio before it is never labelled.
        s.timeline.skip_to(s.feed.next_frame)
        s.timeline.new_stream()
        self.worker.send(Kind.OPEN, {"sid": s.sid})
        self._pump(s)

    def _pump(self, s: DiarizerSession, final: bool = False) -> None:
        """Send this session's units while it has credit (all of them when `final`)."""
        if s.sid is None or not self.worker.ready:
            return
        now = time.monotonic()
        while final or len(s.inflight) < MAX_INFLIGHT:
            unit = s.feed.take_unit(flush=final)
            if unit is None:
                return
            seq = s.next_seq()
            self.worker.send(Kind.AUDIO, {"sid": s.sid, "seq": seq}, unit)
            s.inflight.append((seq, now, len(unit)))

    def _on_frames(self, m: dict[str, Any], probs: np.ndarray | None) -> None:
        s = self._streams.get(m["sid"])
        if s is None:  # a stream dropped meanwhile
            return
        now = time.monotonic()
        samples = 0
        while s.inflight and s.inflight[0][0] <= m["seq"]:
            samples = s.inflight.popleft()[2]
        n = self._place(s, m["first"], probs)
        self._work.append((now, m["compute_s"], samples / SAMPLE_RATE))
        if n:
            self.metrics.diarizer_step.observe(m["compute_s"])
        if s.state == "degraded" and not s.closing:
            timeout = self.settings.stt_nemo_diarization_timeout_s
            late = s.inflight and now - s.inflight[0][1] > timeout
            if (s.cause == "timeout" and not late) or (s.cause != "timeout" and n):
                s.set_state("active", None)
        s.wake()
        if not s.closing:
            self._pump(s)

    def _place(self, s: DiarizerSession, first: int, probs: np.ndarray | None) -> int:
        if probs is None or not len(probs):
            return 0
        tl = s.timeline
        for frame, part in s.feed.place(first, probs):
            cut = overlap(frame, tl.frames_end)  # never before what is placed (a new stream)
            if cut < len(part):
                tl.add(frame + cut, part[cut:])
        return len(probs)

    def _on_error(self, sid: str, reason: str) -> None:
        s = self._streams.pop(sid, None)
        if s is None:
            return
        s.sid = None
        s.inflight.clear()
        now = time.monotonic()
        self._errors.append(now)
        log.warning("diarizer step failed for session %s: %s", s.id, reason)
        self.status.notice("diarizer", f"session {s.id}: step failed ({reason}); new stream")
        if s.close_done is not None and not s.close_done.done():
            s.close_done.set_result(None)
            return
        s.set_state("degraded", f"diarizer step failed: {reason}", cause="error")
        if len(self._errors) == ERRORS_MAX and now - self._errors[0] < ERRORS_WINDOW_S:
            self._errors.clear()
            self.worker.kill("errors")
        elif self.worker.ready:
            self._open_stream(s)

    def _skipped(self, s: DiarizerSession, frames: int) -> None:
        self.metrics.queue_dropped.labels("diarizer").inc(frames)
        if not s.skip_noticed:  # once per session: the metric counts the rest
            s.skip_noticed = True
            self.status.notice("diarizer", f"session {s.id}: behind real time, skipped "
                                           f"{frames * FRAME_SAMPLES / SAMPLE_RATE:.1f} s of audio")

    async def _close_session(self, s: DiarizerSession) -> None:
        s.closing = True
        if s.sid is not None and self.worker.ready:
            self._pump(s, final=True)
            s.close_done = asyncio.get_running_loop().create_future()
            s.close_sent = time.monotonic()
            self.worker.send(Kind.CLOSE, {"sid": s.sid})
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(s.close_done, self.settings.stt_nemo_diarization_timeout_s)
        self._release(s, "closed", None)

    def _release(self, s: DiarizerSession, state: str, reason: str | None) -> None:
        """End a session's use of the worker and free its slot for a waiting session."""
        if s.sid is not None:
            self._streams.pop(s.sid, None)
            if s.close_sent is None and not self._closing:
                self.worker.send(Kind.CLOSE, {"sid": s.sid})  # the worker frees the state
            s.sid = None
        freed = s.admitted
        s.admitted = False
        s.inflight.clear()
        s.feed.stop()
        s.timeline.finish()
        s.set_state(state, reason)
        if state == "closed" and s in self._sessions:
            self._sessions.remove(s)
        if freed and self.worker.ready and not self._closing:
            for waiting in self._sessions:
                if waiting.state == "refused":
                    self._admit(waiting)
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
                if now - sent > timeout and s.state == "active" and not s.closing:
                    s.set_state("degraded", f"diarizer step slower than {timeout:g} s", cause="timeout")
                    self.status.notice("diarizer", f"session {s.id}: step slower than {timeout:g} s")
            stuck_after = STUCK_FACTOR * timeout
            if oldest is not None and now - oldest > stuck_after and now - self.worker.last_msg > stuck_after:
                log.error("diarizer worker silent for %.1f s with work outstanding",
                          now - self.worker.last_msg)
                self.worker.kill("stuck")
        self.worker.poll(now)
        self._publish()

    def _publish(self) -> None:
        """Push the engine's figures into the status object and the gauges.

        States go out at once; the ever-changing figures (RTF, worker RSS) at most every
        VOLATILE_EVERY_S, so status subscribers are not pushed a snapshot four times a second.
        """
        now = time.monotonic()
        while self._work and now - self._work[0][0] > 30.0:
            self._work.popleft()
        audio = sum(w[2] for w in self._work)
        rtf = round(sum(w[1] for w in self._work) / audio, 3) if audio else None
        if rtf is not None:
            self.metrics.diarizer_rtf.set(rtf)
        if now - self._volatile_at >= VOLATILE_EVERY_S or self.worker.rss == 0:
            self._volatile_at = now
            self._volatile = {"rtf": rtf, "memory_used_mb": self.worker.rss // MB or None}
        waiting = sum(s.feed.pending_samples for s in self._sessions) // FRAME_SAMPLES
        self.metrics.queue_depth.labels("diarizer").set(waiting)
        state, reason = self.state, self.reason
        degraded = [s for s in self._sessions if s.state == "degraded"]
        if state == "ready" and degraded:
            state, reason = "degraded", f"{len(degraded)} session(s) degraded: {degraded[0].reason}"
        if state == "loading" and self.worker.progress:
            reason = f"loading ({self.worker.progress})"
        self.status.update_diarizer(
            state=state, reason=reason, device=self.figures.get("device"),
            runtime=self.figures.get("runtime"), precision=self.figures.get("precision"),
            model=self.figures.get("model"), progress=self.worker.progress,
            memory_budget_mb=self.budget // MB, sessions=sum(s.admitted for s in self._sessions),
            capacity=self.capacity, restarts=self.restarts, **self._volatile,
        )

    def _set_state(self, state: str, reason: str | None) -> None:
        self.state, self.reason = state, reason
        self._publish()


__all__ = ["DiarizationEngine", "DiarizerSession"]
