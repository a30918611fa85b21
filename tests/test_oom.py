"""The proof for issue 14 item 4: a kernel OOM kill of the worker inside a memory-limited cgroup
(what the unit's MemoryMax makes) leaves the daemon up, and its sessions keep whole transcripts.

systemd is not PID 1 here, so the unit itself (OOMPolicy=continue) cannot run: this uses a
cgroup v1 memory controller directly, with the limit set just above what the daemon and its
loaded worker use. The worker then leaks (its test fault hook) until the kernel's OOM killer,
not the supervisor (budget set far above), ends it; the worker's oom_score_adj of 1000 makes it
the kernel's choice. Skipped where no memory cgroup can be made.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest

from edge.client import stream_audio
from scripts.bench.harness import KEY, daemon_env, diarizer_settings, metrics, process, status
from tests.fakes.google_speech import encode, fake_speech, utterances

pytestmark = [pytest.mark.nemo, pytest.mark.slow, pytest.mark.timeout(300)]
SR = 16000


def _memory_cgroup_parent() -> Path | None:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            parent = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            if (parent / "memory.limit_in_bytes").exists() and os.access(parent, os.W_OK):
                return parent
    return None


@contextlib.contextmanager
def memory_cgroup(name: str) -> Iterator[Path]:
    parent = _memory_cgroup_parent()
    if parent is None:
        pytest.skip("no writable cgroup v1 memory controller")
    cg = parent / name
    cg.mkdir(exist_ok=True)
    try:
        yield cg
    finally:
        for _ in range(50):
            with contextlib.suppress(OSError):
                cg.rmdir()
                break
            time.sleep(0.1)


async def test_a_kernel_oom_kill_of_the_worker_leaves_the_daemon_and_its_transcripts(
    tmp_path: Path,
) -> None:
    audio, script = encode(utterances(16, words=4))  # ~40 s per session, at 1.5x: ~27 s
    settings = {
        **diarizer_settings("tiny"), "NEMO_CACHE_DIR": str(tmp_path / "cache"),
        "EDGE_DIARIZATION_MAX_RTF": "0", "EDGE_DIARIZATION_MEMORY_MB": "65536",
        # After 20 steps the worker leaks 4 GB: far past the cgroup's limit.
        "EDGE_DIARIZATION_FAULTS": "step_alloc:mb=4096,after=20",
    }
    with memory_cgroup(f"edge-oom-{os.getpid()}") as cg:
        async with fake_speech() as (_fake, endpoint):
            command = f'echo $$ > {cg}/cgroup.procs && exec {sys.executable} -m edge serve'
            env = daemon_env(EDGE_STT_ENDPOINT=endpoint, EDGE_STT_INSECURE="true", **settings)
            with process(["sh", "-c", command], env, r"listening on \S+:(\d+)") as (proc, m):
                http, ws = f"http://127.0.0.1:{m.group(1)}", f"ws://127.0.0.1:{m.group(1)}"
                while (await status(http))["diarizer"]["state"] != "ready":
                    await asyncio.sleep(0.2)
                worker = [c.pid for c in psutil.Process(proc.pid).children()
                          if "edge.diarization.worker" in " ".join(c.cmdline())]
                assert len(worker) == 1 and str(worker[0]) in (cg / "cgroup.procs").read_text().split()
                used = int((cg / "memory.usage_in_bytes").read_text())
                (cg / "memory.limit_in_bytes").write_text(str(used + 512 * 2**20))
                samples = np.frombuffer(audio, dtype="<i2")
                sessions = [asyncio.create_task(stream_audio(ws, samples, SR, key=KEY, speed=1.5))
                            for _ in range(2)]
                results = await asyncio.gather(*sessions)
                snapshot = await status(http)
                counts = await metrics(http)
                assert proc.poll() is None and psutil.pid_exists(proc.pid)  # the daemon lives
            oom = dict(line.split() for line in (cg / "memory.oom_control").read_text().splitlines())
    for r in results:  # whole transcripts, whatever happened to the worker
        assert r.close_code == 1000
        words = [w["word"] for f in r.finals for w in f["channel"]["alternatives"][0]["words"]]
        assert words == [s.text for s in script]
    assert int(oom["oom_kill"]) >= 1, oom  # the kernel, not the supervisor, killed it
    assert counts.get('edge_diarizer_worker_restarts_total{cause="crash"}', 0) >= 1, counts
    assert counts.get('edge_diarizer_worker_restarts_total{cause="memory"}', 0) == 0
    assert any("killed by SIGKILL" in n["message"] for n in snapshot["notices"]), snapshot["notices"]
