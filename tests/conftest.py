"""Shared fixtures: a real daemon on a real socket, in-process or as a subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from edge.app import App
from edge.settings import load_settings

ROOT = Path(__file__).resolve().parent.parent
KEY = "test-key-0123456789"

# Settings tests set variables one by one; start each test from a clean slate.
_OURS = re.compile(r"^(EDGE_|STT_|NEMO_|HF_TOKEN$|HF_HUB_OFFLINE$|NOTIFY_SOCKET$|WATCHDOG_)")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if _OURS.match(name):
            monkeypatch.delenv(name)
    # Never pick up a developer's ./.env or the device's /etc/edge/edge.env.
    empty = tmp_path / "empty.env"
    empty.write_text("")
    monkeypatch.setenv("EDGE_ENV_FILE", str(empty))


@contextlib.asynccontextmanager
async def running_app(**overrides: Any) -> AsyncIterator[App]:
    """An App on 127.0.0.1 with an OS-chosen port, stopped (and drained) on exit."""
    overrides.setdefault("edge_port", 0)
    overrides.setdefault("edge_api_keys", KEY)
    overrides.setdefault("stt_enable_nemo_diarization_fallback", False)
    app = App(load_settings(**overrides))
    task = asyncio.create_task(app.run())
    while app.server._ws is None:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield app
    finally:
        app.stop()
        await asyncio.wait_for(task, 30)


@pytest.fixture
async def app() -> AsyncIterator[App]:
    async with running_app() as a:
        yield a


def daemon_env(**env: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not _OURS.match(k)}
    base.update({"EDGE_PORT": "0", "EDGE_API_KEYS": KEY, "PYTHONUNBUFFERED": "1"})
    base.update(env)
    return base


@contextlib.contextmanager
def daemon_process(fd_limit: int | None = None,
                   **env: str) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """`python -m edge serve` as a child; yields (process, port) once it listens.
    `fd_limit`: its RLIMIT_NOFILE (soft and hard), as a unit's LimitNOFILE= would set."""

    def limit_fds() -> None:
        if fd_limit is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (fd_limit, fd_limit))

    proc = subprocess.Popen(
        [sys.executable, "-m", "edge", "serve"],
        cwd=ROOT, env=daemon_env(**env), stderr=subprocess.PIPE, text=True,
        preexec_fn=limit_fds,
    )
    assert proc.stderr is not None
    port = None
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            m = re.search(r"listening on \S+:(\d+)", line)
            if m:
                port = int(m.group(1))
                break
        if port is None:
            raise AssertionError("daemon did not start:\n" + "".join(lines))
        # Keep draining its log so a full pipe never blocks the daemon.
        threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
