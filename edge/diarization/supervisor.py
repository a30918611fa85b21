"""Keeps one diarizer worker process running: spawn, load, watch, kill, restart with backoff.

The engine (edge/diarization/engine.py) owns the sessions; this owns the process, and tells the
engine what happened through a `Handler`. Everything runs on the event loop.

- Exit detection: the worker's stdout reaches end of file the moment it dies, however it dies
  (exit, crash, SIGKILL from us or the OOM killer).
- Restart: backoff 0.5 s doubling to 30 s; a worker that stayed ready for 60 s resets it. Five
  starts in a row that never reach READY give up (unavailable). A FATAL from the worker (no
  NeMo, no model, a model that does not load) is final at once: retrying cannot help. A spawn
  that fails (EMFILE under a flood of connections, ENOMEM, EAGAIN: any OSError) is a passing
  condition of the machine, not of the model: it is retried with the same backoff, forever,
  and never counts towards giving up.
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
import logging
import signal
import time
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
        self.ready = False
        self.final = False
        self.closing = False
        self.restarts = 0
        self.rss = 0
        self.progress: str | None = None
        self.last_msg = time.monotonic()
        self._ps: psutil.Process | None = None
        self._generation = -1
        # The files the last ready worker verified (READY `digests`, at most MAX_DIGESTS): sent
        # in the next LOAD, so a restart re-hashes only files changed since (once per daemon life).
        self._digests: list[Any] = []
        self._kill_cause: str | None = None
        self._ready_at: float | None = None
        self._last_rss = self._last_stats = time.monotonic()
        self._stopping: asyncio.Task[int] | None = None  # held: the loop keeps only weak refs

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> asyncio.Task[None]:
        return asyncio.create_task(self._supervise(), name="diarizer-supervisor")

    async def stop(self) -> None:
        """Ask the worker to exit (SHUTDOWN), SIGKILL it after 5 s; no restart."""
        self.closing = True
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
        """Stop for good (the engine found the model cannot be used); the worker exits."""
        self.final = True
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
        if not self.ready and now - self.last_msg > LOAD_STALL_S:
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
        failures = spawn_failures = 0
        while not (self.closing or self.final):
            cause = await self._run_worker()
            if self.closing or self.final:
                return
            self.restarts += 1
            self.metrics.diarizer_restarts.labels(cause).inc()
            if cause == "spawn":
                spawn_failures += 1
                await asyncio.sleep(BACKOFF_S[min(spawn_failures - 1, len(BACKOFF_S) - 1)])
                continue
            spawn_failures = 0
            healthy = self._ready_at is not None and time.monotonic() - self._ready_at >= HEALTHY_RUN_S
            failures = 0 if healthy else failures + 1
            if self._ready_at is None and failures >= MAX_START_FAILURES:
                self.give_up(f"worker failed to start {failures} times in a row (last: {cause})")
                return
            await asyncio.sleep(BACKOFF_S[min(failures, len(BACKOFF_S) - 1)])

    async def _run_worker(self) -> str:
        """One worker from spawn to exit. Returns the cause of its end."""
        self.ready, self._ready_at, self._kill_cause, self.progress = False, None, None, None
        self._generation += 1
        try:
            proc = await WorkerProcess.spawn()
        except OSError as exc:
            reason = f"worker could not start: {exc.strerror or exc}"
            log.error("%s; retrying", reason)
            self.handler.on_lost(reason)
            return "spawn"
        self.proc, self._ps, self.last_msg = proc, None, time.monotonic()
        with contextlib.suppress(psutil.Error):
            self._ps = psutil.Process(proc.pid)
        proc.send(Kind.LOAD, {"settings": worker_settings(self.settings), "generation": self._generation,
                              "digests": self._digests})
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
        self.proc, self._ps, self.ready, self.rss, self.progress = None, None, False, 0, None
        cause = self._kill_cause or "crash"
        if not (self.closing or self.final):
            how = f"killed by {signal_name(-rc)}" if rc < 0 else f"exited with code {rc}"
            reason = f"worker {how}" + (f" ({cause})" if self._kill_cause else "")
            log.warning("diarizer %s; restarting", reason)
            self.handler.on_lost(reason)
        return cause

    def _dispatch(self, msg: wire.Message) -> None:
        kind, m = msg.kind, msg.meta
        if kind is Kind.PROGRESS:
            done, total = m.get("done", 0), m.get("total", 0)
            self.progress = m["phase"] + (f" {done / total:.0%}" if total else "")
            self.handler.on_progress()
        elif kind is Kind.READY:
            self.ready, self._ready_at, self.progress = True, time.monotonic(), None
            digests = m.get("digests")
            self._digests = digests[-MAX_DIGESTS:] if isinstance(digests, list) else []
            self.handler.on_ready(m)
        elif kind is Kind.FATAL:
            self.final = True
            self.handler.on_final(m["reason"])
        elif kind is Kind.HELLO:
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


__all__ = ["DAEMON_ONLY", "Handler", "WorkerSupervisor", "signal_name", "worker_settings"]
