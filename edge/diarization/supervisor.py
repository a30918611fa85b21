"""Keeps one diarizer worker process running: spawn, load, watch, kill, restart with backoff.

The engine (edge/diarization/engine.py) owns the sessions; this owns the process, and tells the
engine what happened through a `Handler`. Everything runs on the event loop.

- Exit detection: the worker's stdout reaches end of file the moment it dies, however it dies
  (exit, crash, SIGKILL from us or the OOM killer).
- Restart (`RestartPolicy`): a worker that had reached READY is restarted at once the first
  time it dies; workers that keep dying before a healthy run (READY for 60 s) back off 0.5 s,
  doubling to 30 s, and a healthy run resets that. Five starts in a row that never reach READY
  give up (unavailable). A FATAL from the worker (no NeMo, no model, a model that does not
  load) is final at once: retrying cannot help. A spawn that fails (EMFILE under a flood of
  connections, ENOMEM, EAGAIN: any OSError) is a passing condition of the machine, not of the
  model: it is retried with the same backoff, forever, and never counts towards giving up.
- What a restart reuses from the last ready worker (sent in LOAD): the files it verified
  (`digests`) and its warm-up measurement (`warmup`), which the new worker takes only for the
  same model, runtime, precision, device, threads and streaming parameters.
- State (`WorkerState`): one enum owned here, changed only by this class's methods, each
  transition checked against the state it leaves; the engine reads `ready`.
- Kill causes, the `edge_diarizer_worker_restarts{cause}` label: "crash" (it died on its own),
  "stuck" (the engine saw it silent with work outstanding), "memory" (RSS above the budget plus
  margin), "errors" (repeated failed steps), "protocol" (a malformed frame), "internal" (a bug
  on our side while handling its message).
- Memory: RSS polled every second with psutil; above `EDGE_DIARIZATION_MEMORY_MB` + max(64 MB,
  10%) once the model is loaded (the load itself peaks higher, briefly) -> killed, cause
  "memory". A loading worker silent for LOAD_STALL_S is killed as stuck.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import signal
import time
from dataclasses import dataclass
from typing import Any, Protocol

import psutil
from pydantic import SecretStr

from edge.device import worker_rss_limit
from edge.diarization import wire
from edge.diarization.digests import MAX_DIGESTS
from edge.diarization.process import WorkerProcess
from edge.diarization.wire import Kind
from edge.metrics import Metrics
from edge.settings import Settings

log = logging.getLogger("edge.diarization")

MB = 2**20
BACKOFF_S = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
MAX_START_FAILURES = 5
HEALTHY_RUN_S = 60.0
LOAD_STALL_S = 600.0  # downloads report progress, so a long silence while loading is a hang
STATS_EVERY_S = 10.0
EXIT_GRACE_S = 5.0  # after its pipe closes, a worker has this long to be reaped before SIGKILL


class WorkerState(enum.IntEnum):
    """Where the supervisor's worker is. Owned by `WorkerSupervisor`; see `TRANSITIONS`."""

    IDLE = 0  # no worker: before start(), or between two (its exit seen, the backoff running)
    LOADING = 1  # spawned and sent LOAD, no READY yet
    READY = 2  # loaded and measured: the engine may use it
    FINAL = 3  # no worker ever again (a FATAL, or five failed starts, or the engine gave up)
    CLOSED = 4  # stop() was called: no restart


TRANSITIONS: dict[WorkerState, frozenset[WorkerState]] = {
    WorkerState.IDLE: frozenset({WorkerState.LOADING, WorkerState.FINAL, WorkerState.CLOSED}),
    WorkerState.LOADING: frozenset({WorkerState.READY, WorkerState.IDLE, WorkerState.FINAL,
                                    WorkerState.CLOSED}),
    WorkerState.READY: frozenset({WorkerState.IDLE, WorkerState.FINAL, WorkerState.CLOSED}),
    WorkerState.FINAL: frozenset({WorkerState.CLOSED}),
    WorkerState.CLOSED: frozenset(),
}


class StateError(RuntimeError):
    """A transition `TRANSITIONS` does not allow: a bug in the supervisor, never the worker's."""


@dataclass
class RestartPolicy:
    """When the next worker starts, told how each one ended (sans-I/O: no clock, no process).

    - A worker that reached READY proved the model loads: the first time one dies it is
      restarted at once (`0.0`), whatever killed it.
    - Workers that keep ending before a healthy run (`healthy_run_s` of READY) are a crash
      loop: the second such end in a row waits `backoff[0]`, the next `backoff[1]`, ... up to
      the last. A healthy run clears this.
    - `max_start_failures` workers in a row that never reach READY: give up (`None`).
    - A failed spawn waits `backoff[n]` for its n-th in a row and never gives up; a spawn
      that works clears that count (a machine short of descriptors is not a broken model).
    """

    backoff: tuple[float, ...] = BACKOFF_S
    healthy_run_s: float = HEALTHY_RUN_S
    max_start_failures: int = MAX_START_FAILURES
    unhealthy: int = 0  # workers in a row that ended before a healthy run
    start_failures: int = 0  # workers in a row that never reached READY
    spawn_failures: int = 0  # spawns in a row that failed (OSError)

    def after_exit(self, ready_for: float | None) -> float | None:
        """Seconds to wait before the next start, after a worker that was READY for `ready_for`
        seconds (None: it never was); None when it is pointless to go on."""
        self.spawn_failures = 0
        if ready_for is not None and ready_for >= self.healthy_run_s:
            self.unhealthy = self.start_failures = 0
            return 0.0
        self.unhealthy += 1
        if ready_for is None:
            self.start_failures += 1
            if self.start_failures >= self.max_start_failures:
                return None
            return self._wait(self.unhealthy - 1)
        self.start_failures = 0
        return 0.0 if self.unhealthy == 1 else self._wait(self.unhealthy - 2)

    def after_spawn_failure(self) -> float:
        """Seconds to wait after a spawn that raised `OSError`."""
        self.spawn_failures += 1
        return self._wait(self.spawn_failures - 1)

    def _wait(self, n: int) -> float:
        return self.backoff[min(n, len(self.backoff) - 1)]


class Handler(Protocol):
    def on_message(self, msg: wire.Message) -> None: ...  # a reply about a stream, or stats
    def on_ready(self, figures: dict[str, Any]) -> None: ...  # the worker loaded and measured
    def on_lost(self, reason: str) -> None: ...  # the worker is gone; a new one will come
    def on_final(self, reason: str) -> None: ...  # no worker ever again (unavailable)
    def on_progress(self) -> None: ...  # `progress` changed


class WorkerSupervisor:
    """One worker at a time, restarted until told to stop or it is pointless."""

    def __init__(self, settings: Settings, metrics: Metrics, handler: Handler) -> None:
        self.settings, self.metrics, self.handler = settings, metrics, handler
        self.budget = settings.edge_diarization_memory_mb * MB
        self.rss_limit = worker_rss_limit(self.budget)
        self.proc: WorkerProcess | None = None
        self.state = WorkerState.IDLE
        self.policy = RestartPolicy()
        self.restarts = 0
        self.last_backoff_s: float | None = None  # the wait before the latest restart
        self.rss = 0
        self.progress: str | None = None
        self.last_msg = time.monotonic()
        self._ps: psutil.Process | None = None
        self._generation = -1
        # What the last ready worker left for its successor, sent in every LOAD: the files it
        # verified (READY `digests`, at most MAX_DIGESTS), so a restart re-hashes only files
        # changed since, and its warm-up figures with their key (READY `warmup`), reused by a
        # worker whose key is the same instead of stepping the model again.
        self._digests: list[Any] = []
        self._warmup: dict[str, Any] | None = None
        self._kill_cause: str | None = None
        self._spawned_at = self._hello_at = 0.0
        self._ready_at: float | None = None
        self._last_rss = self._last_stats = time.monotonic()
        self._stopping: asyncio.Task[int] | None = None  # held: the loop keeps only weak refs

    @property
    def ready(self) -> bool:
        """The worker is loaded and measured: streams may be opened on it."""
        return self.state is WorkerState.READY

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def _move(self, to: WorkerState) -> None:
        """The one place `state` changes. Raises `StateError` for a transition not in
        `TRANSITIONS` (no await between a caller's check and this)."""
        if to not in TRANSITIONS[self.state]:
            raise StateError(f"diarizer supervisor: {self.state.name} -> {to.name} is not allowed")
        self.state = to

    def start(self) -> asyncio.Task[None]:
        return asyncio.create_task(self._supervise(), name="diarizer-supervisor")

    async def stop(self) -> None:
        """Ask the worker to exit (SHUTDOWN), SIGKILL it after 5 s; no restart."""
        if self.state is not WorkerState.CLOSED:
            self._move(WorkerState.CLOSED)
        if self.proc is not None:
            await self.proc.stop(grace=5.0)

    def send(self, kind: Kind, meta: dict[str, Any] | None = None, array: Any = None) -> bool:
        return self.proc is not None and self.proc.send(kind, meta, array)

    def kill(self, cause: str) -> None:
        """SIGKILL the worker; it is restarted with `cause` as the reason."""
        if self.proc is not None and self._kill_cause is None:
            log.warning("killing the diarizer worker (%s)", cause)
            self._kill_cause = cause
            self.proc.kill()

    def give_up(self, reason: str) -> None:
        """Stop for good (the engine found the model cannot be used); the worker exits.
        Does nothing once final or closed."""
        if self.state in (WorkerState.FINAL, WorkerState.CLOSED):
            return
        self._move(WorkerState.FINAL)
        if self.proc is not None:
            self._stopping = asyncio.get_running_loop().create_task(self.proc.stop())
        self.handler.on_final(reason)

    def poll(self, now: float) -> None:
        """Housekeeping from the engine's tick: RSS (1 s), STATS (10 s), a stalled load."""
        if self.proc is None:
            return
        if now - self._last_rss >= 1.0:
            self._last_rss = now
            self._poll_rss()
        if self.ready and now - self._last_stats >= STATS_EVERY_S:
            self._last_stats = now
            self.send(Kind.STATS)
        if self.state is WorkerState.LOADING and now - self.last_msg > LOAD_STALL_S:
            self.kill("stuck")

    def _poll_rss(self) -> None:
        if self._ps is None:
            return
        try:
            self.rss = self._ps.memory_info().rss
        except psutil.Error:
            return
        self.metrics.diarizer_memory.set(self.rss)
        if self.ready and self.rss > self.rss_limit:
            log.error("diarizer worker RSS %d MB is above the budget %d MB + margin (%d MB)",
                      self.rss // MB, self.budget // MB, self.rss_limit // MB)
            self.kill("memory")

    # --- the loop ---
    async def _supervise(self) -> None:
        while self.state is WorkerState.IDLE:
            cause, ready_for = await self._run_worker()
            if self.state is not WorkerState.IDLE:  # final or closed meanwhile
                return
            self.restarts += 1
            self.metrics.diarizer_restarts.labels(cause).inc()
            if cause == "spawn":
                wait: float | None = self.policy.after_spawn_failure()
            else:
                wait = self.policy.after_exit(ready_for)
            if wait is None:
                self.give_up(f"worker failed to start {self.policy.start_failures} times in a row "
                             f"(last: {cause})")
                return
            self.last_backoff_s = wait
            if wait > 0:
                await asyncio.sleep(wait)

    async def _run_worker(self) -> tuple[str, float | None]:
        """One worker from spawn to exit. Returns the cause of its end and how long it was
        ready (None: never)."""
        self._ready_at, self._kill_cause, self.progress = None, None, None
        self._generation += 1
        try:
            proc = await WorkerProcess.spawn()
        except OSError as exc:
            reason = f"worker could not start: {exc.strerror or exc}"
            log.error("%s; retrying", reason)
            self.handler.on_lost(reason)
            return "spawn", None
        if self.state is not WorkerState.IDLE:  # stop() or give_up() while it was spawning
            await proc.stop(grace=EXIT_GRACE_S)
            return "closed", None
        self._move(WorkerState.LOADING)
        self.proc, self._ps, self.last_msg = proc, None, time.monotonic()
        self._spawned_at = self._hello_at = self.last_msg
        with contextlib.suppress(psutil.Error):
            self._ps = psutil.Process(proc.pid)
        proc.send(Kind.LOAD, {"settings": worker_settings(self.settings), "generation": self._generation,
                              "digests": self._digests, "warmup": self._warmup})
        try:
            while (msg := await proc.recv()) is not None:
                self.last_msg = time.monotonic()
                self._dispatch(msg)
        except wire.WireError as exc:
            log.error("diarizer worker broke the protocol: %s", exc)
            self.kill("protocol")
        except Exception:  # a bug on our side must not end supervision: restart the worker
            log.exception("failed handling a diarizer worker message")
            self.kill("internal")
        try:
            rc = await asyncio.wait_for(proc.wait(), EXIT_GRACE_S)
        except asyncio.TimeoutError:  # its pipe closed but it lives on: make sure
            proc.kill()
            rc = await proc.wait()
        ready_for = None if self._ready_at is None else time.monotonic() - self._ready_at
        self.proc, self._ps, self.rss, self.progress = None, None, 0, None
        cause = self._kill_cause or "crash"
        if self.state in (WorkerState.LOADING, WorkerState.READY):
            self._move(WorkerState.IDLE)
            how = f"killed by {signal_name(-rc)}" if rc < 0 else f"exited with code {rc}"
            reason = f"worker {how}" + (f" ({cause})" if self._kill_cause else "")
            log.warning("diarizer %s; restarting", reason)
            self.handler.on_lost(reason)
        return cause, ready_for

    def _dispatch(self, msg: wire.Message) -> None:
        kind, m = msg.kind, msg.meta
        if kind is Kind.PROGRESS:
            done, total = m.get("done", 0), m.get("total", 0)
            self.progress = m["phase"] + (f" {done / total:.0%}" if total else "")
            self.handler.on_progress()
        elif kind is Kind.READY:
            if self.state is not WorkerState.LOADING:  # closed or final while it loaded
                log.info("diarizer worker ready while %s: not used", self.state.name.lower())
                return
            self._move(WorkerState.READY)
            self._ready_at, self.progress = time.monotonic(), None
            digests, warmup = m.get("digests"), m.get("warmup")
            self._digests = digests[-MAX_DIGESTS:] if isinstance(digests, list) else []
            self._warmup = warmup if isinstance(warmup, dict) else None
            # The worker times its own load phases; the interpreter's start up to HELLO is ours.
            phases = m.get("phases") if isinstance(m.get("phases"), dict) else {}
            figures = dict(m, spawn_to_ready_s=round(self._ready_at - self._spawned_at, 3),
                           phases={"boot": round(self._hello_at - self._spawned_at, 3), **phases})
            self.handler.on_ready(figures)
        elif kind is Kind.FATAL:
            if self.state in (WorkerState.LOADING, WorkerState.READY):  # else: already over
                self._move(WorkerState.FINAL)
                self.handler.on_final(m["reason"])
        elif kind is Kind.HELLO:
            self._hello_at = self.last_msg
            if m.get("version") != wire.VERSION:
                raise wire.WireError(f"worker speaks protocol {m.get('version')}, not {wire.VERSION}")
        else:
            self.handler.on_message(msg)


# The daemon's own settings that the worker never needs: who may connect, and how.
DAEMON_ONLY = frozenset({
    "edge_api_keys", "edge_api_keys_file", "edge_allow_unauthenticated", "edge_host",
    "edge_tls_cert", "edge_tls_key",
})


def worker_settings(settings: Settings) -> dict[str, Any]:
    """The LOAD message's settings: everything but `DAEMON_ONLY` (so no API key ever reaches the
    worker), secrets the worker uses (HF_TOKEN, for a download) in clear: our own child, over a
    pipe. The worker rebuilds `Settings` from this; the left-out fields take their defaults."""
    values = settings.model_dump(mode="json", exclude=set(DAEMON_ONLY))
    for name in values:
        value = getattr(settings, name)
        if isinstance(value, SecretStr):
            values[name] = value.get_secret_value()
    return values


def signal_name(signum: int) -> str:
    """`SIGKILL` for a named signal, `signal 35` for one Python has no name for (real-time)."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


__all__ = ["DAEMON_ONLY", "TRANSITIONS", "Handler", "RestartPolicy", "StateError", "WorkerState",
           "WorkerSupervisor", "signal_name", "worker_settings"]
