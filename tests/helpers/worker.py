"""The supervised diarization worker under test: markers, waits, and a talker that pushes speech
into a diarizer session on the session clock. The fixtures that start engines are in conftest."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import psutil
import pytest

from edge.clock import AudioBlock
from edge.diarization import nemo_diarization_available
from edge.diarization.engine import DiarizationEngine
from edge.diarization.session import DiarizerSession
from tests.helpers.diarization import SR, speechlike

needs_nemo = pytest.mark.skipif(not nemo_diarization_available()[0], reason="NeMo not installed")


def engine_test(fn: Any) -> Any:
    """A test that runs the real worker with NeMo: seconds to start, so also `slow`."""
    return needs_nemo(pytest.mark.nemo(pytest.mark.slow(fn)))


def worker_children() -> list[psutil.Process]:
    """This process's descendants that run the diarization worker."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "edge.diarization.worker" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


async def until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `cond` until it holds; raises AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.05)


async def ready(engine: DiarizationEngine, timeout: float = 90) -> None:
    """Wait for `engine` to finish loading and assert that it is ready."""
    await until(lambda: engine.state != "loading", timeout, "the engine to load")
    assert engine.state == "ready", (engine.state, engine.reason)


class Talker:
    """Pushes speech-like audio into a diarizer session on the session clock."""

    def __init__(self, session: DiarizerSession, seed: int = 0) -> None:
        self.session = session
        self.pcm = (speechlike(240.0, seed) * 32767).astype("<i2")
        self.pos = 0

    async def talk(self, seconds: float, speed: float = 4.0, block_s: float = 0.1) -> None:
        """Push `seconds` of audio in `block_s` blocks at `speed` x real time."""
        n = int(block_s * SR)
        for _ in range(round(seconds / block_s)):
            self.session.push(AudioBlock(self.pos, self.pcm[self.pos:self.pos + n].tobytes()))
            self.pos += n
            await asyncio.sleep(block_s / speed)

    @property
    def t(self) -> float:
        return self.pos / SR


async def labels_flow(talker: Talker, timeout: float = 30) -> None:
    """Keep talking until the timeline covers audio pushed from now on (labels are back)."""
    target = talker.t + 1.0
    deadline = time.monotonic() + timeout
    while talker.session.timeline.covered_until < target or talker.session.state != "active":
        if time.monotonic() > deadline:
            raise AssertionError(f"labels did not come back: {talker.session.state} "
                                 f"{talker.session.reason} covered {talker.session.timeline.covered_until}")
        await talker.talk(0.5)


def restarts(engine: DiarizationEngine, cause: str) -> float:
    """How many times `engine`'s worker was restarted for `cause` (its metric)."""
    return engine.metrics.diarizer_restarts.labels(cause)._value.get()
