"""Test-only fault injection for the diarizer worker (`EDGE_DIARIZATION_FAULTS`).

Imported by the worker only when that setting is given, so a device never loads it. Faults make
chosen steps raise, hang, leak memory or kill the process, so tests exercise the real supervisor
against the real worker.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any

log = logging.getLogger("edge.diarization.worker")


class Faults:
    """Test-only fault injection, parsed from `EDGE_DIARIZATION_FAULTS`.

    Rules separated by `;`, each `kind[:key=value,...]`. Kinds: `step_raise` (the step raises),
    `step_sleep` (`seconds=`, the step hangs), `step_alloc` (`mb=`, the step leaks that much
    resident memory), `step_kill` (the process SIGKILLs itself, like the OOM killer),
    `warmup_sleep` (`seconds=`, each warm-up step that much slower: a slow device).
    Keys for all: `session=` (only that session id), `after=` (skip that many matching steps
    first, default 0), `count=` (fire that often, default 1), `gen=` (only in that worker
    generation, default 0 = the first worker; `any` for every one).
    """

    def __init__(self, spec: str | None, generation: int) -> None:
        self.rules: list[dict[str, Any]] = []
        for part in (spec or "").split(";"):
            if not part.strip():
                continue
            kind, _, args = part.strip().partition(":")
            rule: dict[str, Any] = {"kind": kind, "after": 0, "count": 1, "gen": "0"}
            for item in filter(None, args.split(",")):
                key, _, value = item.partition("=")
                rule[key.strip()] = value.strip()
            if rule["gen"] in ("any", str(generation)):
                rule["after"], rule["count"] = int(rule["after"]), int(rule["count"])
                self.rules.append(rule)
        self._leak: list[bytearray] = []

    def before_step(self, session_id: str) -> None:
        for rule in self.rules:
            if rule.get("session") not in (None, session_id) or rule["count"] <= 0:
                continue
            if rule["after"] > 0:
                rule["after"] -= 1
                continue
            rule["count"] -= 1
            kind = rule["kind"]
            log.warning("test fault %s on session %s", kind, session_id)
            if kind == "step_raise":
                raise RuntimeError("injected fault: step_raise")
            if kind == "step_sleep":
                time.sleep(float(rule.get("seconds", 60)))
            elif kind == "step_alloc":
                block = bytearray(int(float(rule.get("mb", 100)) * 2**20))
                block[::4096] = b"\x01" * len(block[::4096])  # touch every page: resident
                self._leak.append(block)
            elif kind == "step_kill":
                os.kill(os.getpid(), signal.SIGKILL)

    def warmup_step(self) -> None:
        """`warmup_sleep` (`seconds=`): a warm-up step this much slower (a slow device)."""
        for rule in self.rules:
            if rule["kind"] == "warmup_sleep" and rule["count"] > 0:
                rule["count"] -= 1
                time.sleep(float(rule.get("seconds", 1)))
