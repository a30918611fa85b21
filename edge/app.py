"""The composition root: build the parts, then start-up -> main loop -> shutdown.

The whole life of the daemon reads top to bottom in `App.run()`. SIGTERM/SIGINT end the main
loop; shutdown tells systemd STOPPING=1, stops accepting, drains every open session within
`EDGE_DRAIN_S` and releases shared resources. A second signal cuts the drain short.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import threading
import time
from collections.abc import Callable

from edge.decode_process import DecoderProcess
from edge.diarization.admission import nemo_check
from edge.diarization.engine import DiarizationEngine
from edge.health import REQUIRED_PACKAGES, UPSTREAM_PACKAGES, LoopMonitor, Status, missing_packages
from edge.listen import ListenService
from edge.metrics import Metrics
from edge.server import Server
from edge.session import SessionDeps
from edge.settings import Settings
from edge.stt.google import create_upstream
from edge.systemd import Notifier

log = logging.getLogger("edge.app")

NEMO_OK = (
    "NeMo diarization fallback available "
    "(STT speaker labels when Google diarization unavailable)"
)


class App:
    def __init__(self, settings: Settings, notifier: Notifier | None = None) -> None:
        self.settings = settings
        self.status = Status(max_sessions=settings.edge_max_sessions)
        self.metrics = Metrics()
        self.notifier = notifier or Notifier()
        self.monitor = LoopMonitor(observe=self.metrics.loop_lag.observe)
        self.engine = DiarizationEngine(settings, self.status, self.metrics)
        self.decoders = (DecoderProcess(metrics=self.metrics) if settings.edge_decoder == "process"
                         else None)
        self.deps = SessionDeps(settings, self.status, self.metrics, upstream=None,
                                engine=self.engine, decoders=self.decoders)
        self.listen = ListenService(self.deps)
        self.server = Server(settings, self.status, self.metrics, self.listen)
        # Each returns True while its part is healthy; all must hold for WATCHDOG=1.
        self.watchdog_checks: list[Callable[[], bool]] = [self.monitor.healthy, self.engine.healthy]
        self._stop: asyncio.Event | None = None
        self._signals = 0
        self._shutdown_task: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.started_at = time.monotonic()

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT (or `stop()`), then drain. Returns the exit code."""
        self._stop = asyncio.Event()
        self._install_signal_handlers()
        await self.startup()
        await self.main_loop()
        await self.shutdown()
        return 0

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    # --- start-up ---
    async def startup(self) -> None:
        self._check_packages()
        self._report_nemo()
        # Credentials are found before READY so "ready" means "ready to transcribe"; it is
        # bounded (a GCE metadata probe at worst) and takes milliseconds with a key file.
        self.deps.upstream = await create_upstream(self.settings, self.status, self.metrics)
        await self.server.start()
        self.listen.start()
        self.metrics.watch_gc()
        self._tasks.append(asyncio.create_task(self.monitor.run(), name="loop-monitor"))
        # Start-up objects (modules, settings, the gRPC client) live for the whole run: move
        # them out of the collector's sight so full collections stay short on a busy loop.
        gc.collect()
        gc.freeze()
        if self.status.ready:
            self.notifier.ready(self.status.summary())
            log.info("ready in %.2f s", time.monotonic() - self.started_at)
        else:
            log.error("not ready: %s", self.status.summary())
        # The model loads after READY, in the worker: systemd's start timeout never waits on it.
        await self.engine.start()

    def _check_packages(self) -> None:
        names = REQUIRED_PACKAGES
        if self.settings.edge_stt_api != "none":
            names += UPSTREAM_PACKAGES
        missing = missing_packages(names)
        self.status.set_check("packages", "ok" if not missing else "missing: " + ", ".join(missing))

    def _report_nemo(self) -> None:
        # Seed contract: these exact log lines, and nothing at all when the fallback is off.
        # The engine decided availability; this only says it before READY.
        a = self.engine.availability
        if a.state == "disabled":
            self.status.set_check("nemo", "disabled")
        elif a.state == "unavailable":
            log.warning("NeMo diarization fallback disabled: %s", a.reason)
            self.status.set_check("nemo", nemo_check(str(a.reason)))
            self.status.update_diarizer(state="unavailable", reason=a.reason)
        elif a.nemo_error is None:
            log.info(NEMO_OK)
            self.status.set_check("nemo", "loading")
        else:  # a device without NeMo (install.sh --no-nemo) runs the ONNX export instead
            log.info("NeMo not installed (%s): the diarizer uses the ONNX runtime", a.nemo_error)
            self.status.set_check("nemo", "loading")

    # --- main loop: housekeeping on one tick ---
    async def main_loop(self) -> None:
        assert self._stop is not None
        interval = self.notifier.watchdog_interval
        tick = min(1.0, interval) if interval else 1.0
        last_summary = self.status.summary()
        while not self._stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), tick)
            if interval and all(check() for check in self.watchdog_checks):
                self.notifier.watchdog()
            p50, p99 = self.monitor.percentiles()
            self.metrics.loop_lag_p50.set(p50)
            self.metrics.loop_lag_p99.set(p99)
            self.metrics.tasks.set(len(asyncio.all_tasks()))
            self.metrics.threads.set(threading.active_count())
            summary = self.status.summary()
            if summary != last_summary:
                self.notifier.status(summary)
                last_summary = summary

    # --- shutdown ---
    async def shutdown(self) -> None:
        active = self.status.sessions["active"]
        self.notifier.stopping(f"draining {active} session(s)")
        log.info("shutting down: draining %d session(s), deadline %.1f s",
                 active, self.settings.edge_drain_s)
        self._shutdown_task = asyncio.create_task(self.server.shutdown(self.settings.edge_drain_s))
        try:
            await self._shutdown_task
        except asyncio.CancelledError:
            log.warning("second signal: drain cut short")
        await self.listen.close()
        if self.deps.upstream is not None:
            await self.deps.upstream.close()
        await self.engine.close()
        if self.decoders is not None:
            await self.decoders.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.metrics.unwatch_gc()
        log.info("stopped")

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info("%s received", sig.name)
            self.stop()
        elif self._shutdown_task is not None and not self._shutdown_task.done():
            self._shutdown_task.cancel()


def run(settings: Settings) -> int:
    """Run the daemon on uvloop where available (the default loop otherwise)."""
    try:
        import uvloop
    except ImportError:
        log.info("uvloop not installed: using the default asyncio loop")
        return asyncio.run(App(settings).run())
    return uvloop.run(App(settings).run())


__all__ = ["App", "run"]
