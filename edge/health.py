"""Checks and the status bus: one object feeds `/ready`, the `/v1/status` channel and systemd.

Parts of the daemon write into `Status` (always from the event loop); readers take
`snapshot()`. Subscribers never queue snapshots: they remember the generation they last saw
and `wait_changed()` wakes them once per change (or at the heartbeat), so a slow status client
only ever gets the newest state — the overflow policy is "coalesce to latest".
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import time
from collections import deque
from typing import Any

from edge import __version__

REQUIRED_CHECKS = ("config", "packages")
# Packages the daemon cannot run without; NeMo/torch live in the worker and are optional.
REQUIRED_PACKAGES = ("websockets", "pydantic_settings", "numpy", "soxr", "prometheus_client")
UPSTREAM_PACKAGES = ("google.cloud.speech_v2", "grpc")


def missing_packages(names: tuple[str, ...]) -> list[str]:
    """Names from `names` that cannot be found, without importing them (cheap at start-up)."""
    missing = []
    for name in names:
        try:
            if importlib.util.find_spec(name) is None:
                missing.append(name)
        except (ImportError, ValueError):
            missing.append(name)
    return missing


class Status:
    """The daemon's one status object.

    `checks` maps a check name to `"ok"` or a one-line reason; `ready` is true when every
    required check is ok. `diarizer` holds the local diarizer's figures, `sessions` the
    session counts; `notices` keeps the last few operator-visible warnings (upstream
    outages, diarizer restarts) so the status channel can show *why* something degraded.
    """

    def __init__(self, *, max_sessions: int, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self._started = clock()
        self.checks: dict[str, str] = {
            "config": "ok",
            "packages": "ok",
            "upstream": "unconfigured",
            "nemo": "disabled",
        }
        self.diarizer: dict[str, Any] = {
            "state": "disabled",
            "reason": None,
            "device": None,
            "model": None,
            "progress": None,
            "memory_budget_mb": None,
            "memory_used_mb": None,
            "sessions": 0,
            "capacity": 0,
            "rtf": None,
            "restarts": 0,
        }
        self.sessions: dict[str, int] = {"active": 0, "max": max_sessions}
        self.notices: deque[dict[str, Any]] = deque(maxlen=8)
        self.generation = 0
        self._changed: asyncio.Event | None = None

    # --- writers ---
    def set_check(self, name: str, value: str) -> None:
        if self.checks.get(name) != value:
            self.checks[name] = value
            self._bump()

    def update_diarizer(self, **fields: Any) -> None:
        changed = {k: v for k, v in fields.items() if self.diarizer.get(k) != v}
        if changed:
            self.diarizer.update(changed)
            self._bump()

    def set_sessions(self, active: int) -> None:
        if self.sessions["active"] != active:
            self.sessions["active"] = active
            self._bump()

    def notice(self, source: str, message: str) -> None:
        """Record an operator-visible event (kept: the last 8)."""
        self.notices.append({"t": round(time.time(), 3), "source": source, "message": message})
        self._bump()

    def _bump(self) -> None:
        self.generation += 1
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    # --- readers ---
    @property
    def ready(self) -> bool:
        return all(self.checks.get(name) == "ok" for name in REQUIRED_CHECKS)

    def snapshot(self) -> dict[str, Any]:
        return {
            "type": "Status",
            "ready": self.ready,
            "checks": dict(self.checks),
            "diarizer": dict(self.diarizer),
            "sessions": dict(self.sessions),
            "notices": list(self.notices),
            "version": __version__,
            "uptime_s": round(self._clock() - self._started, 3),
        }

    def public_snapshot(self) -> dict[str, Any]:
        """`snapshot()` without what only an operator may see: each check's reason (upstream
        errors, paths) is cut to its first word(s) before ':', the diarizer's reason and model
        path are left out, and notices (other sessions' ids, error texts) are only counted."""
        snap = self.snapshot()
        snap["checks"] = {name: value.split(":", 1)[0] for name, value in self.checks.items()}
        snap["diarizer"] = {k: v for k, v in self.diarizer.items() if k not in ("reason", "model")}
        snap["notices"] = len(self.notices)
        snap["detail"] = "summary"
        return snap

    def summary(self) -> str:
        """One line for systemd's `STATUS=` (no uptime, so it changes only with the state)."""
        state = "ready" if self.ready else "not ready: " + ", ".join(
            f"{n}={self.checks[n]}" for n in REQUIRED_CHECKS if self.checks[n] != "ok"
        )
        diar = self.diarizer["state"]
        if self.diarizer.get("reason") and diar not in ("ready", "disabled"):
            diar = f"{diar} ({self.diarizer['reason']})"
        return (
            f"{state}; sessions {self.sessions['active']}/{self.sessions['max']}; "
            f"upstream {self.checks['upstream']}; diarizer {diar}"
        )

    async def wait_changed(self, generation: int, timeout: float | None = None) -> int:
        """Wait until the status moves past `generation` (or `timeout` passes).

        Returns the current generation; equal to `generation` means a timeout (heartbeat).
        """
        if self.generation != generation:
            return self.generation
        if self._changed is None:
            self._changed = asyncio.Event()
        event = self._changed
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)
        return self.generation


class LoopMonitor:
    """Measures event-loop lag: a task that sleeps `interval` and records how late it woke.

    `healthy()` is what the systemd watchdog asks: the loop ran a tick recently and was not
    badly late. Lag samples go to the `observe` callback (the metrics histogram).
    """

    def __init__(self, interval: float = 0.05, observe: Any = None) -> None:
        self.interval = interval
        self.observe = observe
        self.last_tick = time.monotonic()
        self.last_lag = 0.0
        self.window: deque[float] = deque(maxlen=200)

    async def run(self) -> None:
        # perf_counter, not loop.time(): uvloop's clock ticks in whole milliseconds.
        while True:
            start = time.perf_counter()
            await asyncio.sleep(self.interval)
            lag = max(0.0, time.perf_counter() - start - self.interval)
            self.last_tick = time.monotonic()
            self.last_lag = lag
            self.window.append(lag)
            if self.observe is not None:
                self.observe(lag)

    def percentiles(self) -> tuple[float, float]:
        """(p50, p99) lag over the last `window` ticks (10 s at 50 ms)."""
        if not self.window:
            return 0.0, 0.0
        ordered = sorted(self.window)
        n = len(ordered)
        return ordered[n // 2], ordered[min(n - 1, int(n * 0.99))]

    def healthy(self, stale_after: float = 5.0) -> bool:
        return time.monotonic() - self.last_tick < stale_after


__all__ = ["REQUIRED_CHECKS", "LoopMonitor", "Status", "missing_packages"]
