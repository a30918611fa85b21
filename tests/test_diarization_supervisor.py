"""The worker supervisor (edge/diarization/supervisor.py): what it sends the worker, and spawns
that fail and are retried. Every test checks that no worker process outlives it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.daemon import ROOT
from tests.helpers.diarization import settings
from tests.helpers.worker import engine_test

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("no_orphans")]


def test_worker_settings_drop_the_api_keys_and_keep_the_hf_token(tmp_path: Path) -> None:
    import json

    from edge.diarization.supervisor import worker_settings

    s = settings(tmp_path, edge_api_keys="k-secret-1,k-secret-2", edge_host="0.0.0.0",
                 hf_token="hf_abc")
    payload = worker_settings(s)
    assert "k-secret" not in json.dumps(payload)
    assert payload["hf_token"] == "hf_abc"  # the worker downloads the model with it
    # The worker can rebuild its settings from it: no keys and a loopback host are valid.
    from edge.settings import Settings

    assert Settings(_env_file=None, **payload).nemo_cache_dir == tmp_path  # type: ignore[call-arg]


@engine_test
def test_a_failed_spawn_is_retried_not_final(tiny_model: Path, tmp_path: Path) -> None:
    """A child daemon whose file descriptor limit is too low to make the worker's pipes
    (EMFILE, as under a flood of connections): the supervisor keeps retrying, and once the
    limit is back the worker starts."""
    code = f"""
import asyncio, json, os, resource
from edge.diarization.supervisor import WorkerSupervisor
from edge.metrics import Metrics
from tests.helpers.diarization import settings

events = []
class Handler:
    def on_message(self, msg): pass
    def on_ready(self, figures): events.append("ready")
    def on_lost(self, reason): events.append("lost: " + reason)
    def on_final(self, reason): events.append("final: " + reason)
    def on_progress(self): pass

async def main():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 1, hard))
    s = settings({str(tmp_path / "cache")!r}, nemo_diar_model_path={str(tiny_model)!r},
                 edge_diarization_max_rtf=0)
    sup = WorkerSupervisor(s, Metrics(), Handler())
    task = sup.start()
    while len(events) < 2:  # two failed spawns, 0.5 s apart
        await asyncio.sleep(0.01)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    for _ in range(2400):
        if "ready" in events or any(e.startswith("final") for e in events):
            break
        await asyncio.sleep(0.05)
    await sup.stop()
    await task
    print(json.dumps(events))

asyncio.run(main())
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr
    import json

    events = json.loads(proc.stdout.splitlines()[-1])
    assert events[:2] == ["lost: worker could not start: Too many open files"] * 2, events
    assert events[-1] == "ready", events
