"""Real daemons for tests: in-process (`running_app`) or as a child (`daemon_process`), alone,
with the fake Google service (`with_fake_google`) or with it and the tiny Sortformer (`appliance`),
and what the tests read off their messages."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge.app import App
from edge.settings import load_settings
from tests.fakes.google_speech import ScriptWord, fake_speech

ROOT = Path(__file__).resolve().parent.parent.parent
KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Token {KEY}"}  # the header a client with KEY sends
SR = 16000

# The daemon's own environment variables: tests start from a clean slate of them.
OURS = re.compile(r"^(EDGE_|STT_|NEMO_|HF_TOKEN$|HF_HUB_OFFLINE$|NOTIFY_SOCKET$|WATCHDOG_)")


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


def daemon_env(**env: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not OURS.match(k)}
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


@contextlib.asynccontextmanager
async def with_fake_google(word_code: str = "exact", **overrides: Any) -> AsyncIterator[App]:
    """`running_app` reaching the fake Google service (`word_code` as `FakeSpeech` takes it)
    through the official client, no local diarizer."""
    async with fake_speech(word_code=word_code) as (_fake, endpoint), running_app(
        edge_stt_endpoint=endpoint, edge_stt_insecure=True, **overrides
    ) as app:
        yield app


@contextlib.asynccontextmanager
async def appliance(tmp_path: Path, *, upstream: str | None, diarizer: bool = True,
                    **overrides: Any) -> AsyncIterator[App]:
    """The daemon with the fake Google service at `upstream` (None: no credentials at all)
    and the tiny Sortformer; yields once the diarizer is ready."""
    from tests.fakes.sortformer import tiny_model_path

    settings: dict[str, Any] = {
        "stt_enable_nemo_diarization_fallback": diarizer,
        "nemo_cache_dir": tmp_path / "cache",
        "edge_model_download": False,
        "edge_diarization_max_rtf": 0,
    }
    if diarizer:
        settings["nemo_diar_model_path"] = tiny_model_path()
    if upstream is not None:
        settings.update(edge_stt_endpoint=upstream, edge_stt_insecure=True)
    settings.update(overrides)
    async with running_app(**settings) as app:
        if diarizer:
            deadline = time.monotonic() + 120
            while app.status.diarizer["state"] != "ready":
                assert time.monotonic() < deadline, app.status.snapshot()
                assert app.status.diarizer["state"] in ("loading", "ready"), app.status.snapshot()
                await asyncio.sleep(0.1)
        yield app


def url(app: App) -> str:
    """The websocket base URL of a running `app`."""
    return f"ws://127.0.0.1:{app.server.port}"


def words_of(message: dict[str, Any]) -> list[dict[str, Any]]:
    """The words of a Results message's first alternative."""
    return message["channel"]["alternatives"][0]["words"]


def final_words(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every word of the final Results among `messages`, in order."""
    return [w for m in messages if m.get("type") == "Results" and m.get("is_final")
            for w in words_of(m)]


def samples(audio: bytes) -> np.ndarray:
    """16-bit little-endian PCM bytes as samples."""
    return np.frombuffer(audio, dtype="<i2")


def assert_words_on_the_session_clock(words: list[dict[str, Any]], script: list[ScriptWord]) -> None:
    """The final words are `script`'s, each at its scripted time on the session clock."""
    assert [w["word"] for w in words] == [s.text for s in script]
    for w, s in zip(words, script, strict=True):
        assert w["start"] == pytest.approx(s.start / SR, abs=0.002)
        assert w["end"] == pytest.approx(s.end / SR, abs=0.002)
