"""Shared fixtures: a clean environment, a real daemon on a real socket, and the diarization
worker (its tiny model, engines that are closed after the test, no worker outliving a test).
The harnesses behind them live in tests/helpers/."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edge.app import App
from edge.diarization import nemo_diarization_available
from edge.diarization.engine import DiarizationEngine
from edge.health import Status
from edge.metrics import Metrics
from tests.helpers.daemon import OURS, running_app
from tests.helpers.diarization import settings
from tests.helpers.worker import worker_children


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if OURS.match(name):
            monkeypatch.delenv(name)
    # Never pick up a developer's ./.env or the device's /etc/edge/edge.env.
    empty = tmp_path / "empty.env"
    empty.write_text("")
    monkeypatch.setenv("EDGE_ENV_FILE", str(empty))


@pytest.fixture
async def app() -> AsyncIterator[App]:
    async with running_app() as a:
        yield a


@pytest.fixture
def no_orphans() -> Iterator[None]:
    """Fails the test if a diarization worker process outlives it (by 5 s)."""
    yield
    deadline = time.monotonic() + 5
    while worker_children() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert worker_children() == [], "a worker process outlived its test"


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The tiny random-weight Sortformer .nemo (built once); skips the test without NeMo."""
    if not nemo_diarization_available()[0]:
        pytest.skip("NeMo not installed")
    from tests.fakes.sortformer import tiny_model_path

    return tiny_model_path()


@pytest.fixture
async def make_engine(tmp_path: Path, tiny_model: Path) -> AsyncIterator[Callable[..., Any]]:
    """`await make_engine(**settings)`: a started DiarizationEngine on the tiny model (unless
    overridden), closed after the test."""
    engines: list[DiarizationEngine] = []

    async def make(**overrides: Any) -> DiarizationEngine:
        overrides.setdefault("nemo_diar_model_path", tiny_model)
        # Compute admission depends on how busy this machine is; only its own test turns it on.
        overrides.setdefault("edge_diarization_max_rtf", 0)
        s = settings(tmp_path / "cache", **overrides)
        engine = DiarizationEngine(s, Status(max_sessions=16), Metrics())
        engines.append(engine)
        await engine.start()
        return engine

    yield make
    for engine in engines:
        await engine.close()
