"""The worker process (edge/diarization/process.py), spawned for real: what it inherits from
the daemon, and that it never outlives it. Every test checks that no worker process outlives it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.helpers.daemon import ROOT

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("no_orphans")]


def test_the_worker_dies_with_the_daemon(tmp_path: Path) -> None:
    """A daemon killed with SIGKILL leaves no worker behind (end of input / PDEATHSIG)."""
    code = (
        "import asyncio, os, sys\n"
        "from edge.diarization.process import WorkerProcess\n"
        "async def main():\n"
        "    proc = await WorkerProcess.spawn()\n"
        "    await proc.recv()\n"
        "    print(proc.pid, flush=True)\n"
        "    await asyncio.sleep(60)\n"
        "asyncio.run(main())\n"
    )
    daemon = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert daemon.stdout is not None
        worker = psutil.Process(int(daemon.stdout.readline()))
        assert worker.is_running()
        daemon.kill()
        daemon.wait(10)
        worker.wait(10)  # raises psutil.TimeoutExpired if the worker outlives the daemon
    finally:
        daemon.kill()
        daemon.wait(10)



async def test_the_worker_is_isolated_from_the_daemons_cwd_and_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A daemon started from a directory holding `numpy.py` and an `edge/` package: the worker
    imports neither, runs in /, gets no API key or Google credentials, and is the OOM killer's
    first choice."""
    from edge.diarization.process import WorkerProcess
    from edge.diarization.wire import Kind

    planted = tmp_path / "planted"
    for name in ("numpy.py", "edge/__init__.py"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(f"open({str(planted)!r}, 'a').write({name!r})\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EDGE_API_KEYS", "k-secret-1")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", "/etc/edge/google.json")
    monkeypatch.setenv("EDGE_STT_PROJECT", "p")
    monkeypatch.setenv("HF_TOKEN", "hf_abc")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    proc = await WorkerProcess.spawn()
    try:
        hello = await proc.recv()
        assert hello is not None and hello.kind is Kind.HELLO
        worker = psutil.Process(proc.pid)
        env = worker.environ()
        assert worker.cwd() == "/"
        assert not planted.exists(), planted.read_text()
        assert not {"EDGE_API_KEYS", "GOOGLE_APPLICATION_CREDENTIALS", "EDGE_STT_PROJECT"} & set(env)
        assert env["HF_TOKEN"] == "hf_abc" and env["OMP_NUM_THREADS"] == "1" and "PATH" in env
        with open(f"/proc/{proc.pid}/oom_score_adj") as f:  # noqa: ASYNC230
            assert f.read().strip() == "1000"
        assert await proc.stop(grace=10) == 0
    finally:
        proc.kill()
        await proc.wait()
