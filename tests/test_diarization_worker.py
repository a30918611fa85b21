"""The supervised worker, for real: a real worker process, the real tiny model, injected faults.

Faults come from the worker's own test-only hook (`EDGE_DIARIZATION_FAULTS`, see
`edge.diarization.worker.Faults`) or from the outside (SIGKILL). Nothing of ours is mocked.
Every test checks that no worker process outlives it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from edge.diarization import nemo_diarization_available
from edge.diarization.engine import DiarizationEngine
from edge.diarization.session import DiarizerSession
from edge.health import Status
from edge.metrics import Metrics
from edge.stt.base import AudioBlock
from tests.diarization_helpers import SR, settings, speechlike

ROOT = Path(__file__).resolve().parent.parent

needs_nemo = pytest.mark.skipif(not nemo_diarization_available()[0], reason="NeMo not installed")
pytestmark = [pytest.mark.timeout(240)]


def engine_test(fn: Any) -> Any:
    """A test that runs the real worker with NeMo: seconds to start, so also `slow`."""
    return needs_nemo(pytest.mark.nemo(pytest.mark.slow(fn)))


def worker_children() -> list[psutil.Process]:
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "edge.diarization.worker" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


@pytest.fixture(autouse=True)
def _no_orphans() -> Iterator[None]:
    yield
    deadline = time.monotonic() + 5
    while worker_children() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert worker_children() == [], "a worker process outlived its test"


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    if not nemo_diarization_available()[0]:
        pytest.skip("NeMo not installed")
    from tests.fakes.sortformer import tiny_model_path

    return tiny_model_path()


@pytest.fixture
async def make_engine(tmp_path: Path, tiny_model: Path) -> AsyncIterator[Callable[..., Any]]:
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


async def until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.05)


async def ready(engine: DiarizationEngine, timeout: float = 90) -> None:
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
    return engine.metrics.diarizer_restarts.labels(cause)._value.get()


@engine_test
async def test_labels_flow_and_close_flushes_the_stream(make_engine: Callable[..., Any]) -> None:
    engine = await make_engine()
    early = engine.open_session("early")  # opened while loading: admitted once ready
    assert early.state == "unavailable" and early.reason == "diarizer loading"
    assert engine.healthy()
    await ready(engine)
    assert early.state == "active"
    f = engine.figures
    assert f["device"] == "cpu" and f["model_rss"] > 100 * 2**20 and f["session_bytes"] > 0
    assert engine.status.checks["nemo"] == "ok"
    d = engine.status.diarizer
    assert d["state"] == "ready" and d["capacity"] == engine.capacity > 0 and d["device"] == "cpu"
    talker = Talker(early)
    await talker.talk(6.0)
    assert await early.wait_covered(3.0, timeout=10)
    speaker, conf = early.timeline.speaker_for(2.0, 2.5)
    assert (speaker is None or 0 <= speaker < 4) and 0.0 <= conf <= 1.0
    assert not await early.wait_covered(1000.0, timeout=0.2)  # bounded wait
    await early.close()
    assert early.state == "closed"
    # finish() flushed the tail: the timeline reaches the last full frame of the audio
    assert early.timeline.covered_until >= talker.t - 0.08
    await early.close()  # idempotent
    await until(lambda: engine.status.diarizer["sessions"] == 0, 3, "the slot to be freed")
    assert engine.metrics.diarizer_step._sum.get() > 0
    assert engine.worker.rss > 100 * 2**20
    # The watchdog decision: healthy while the supervisor ticks, not once it stops.
    assert engine.healthy()
    engine._tasks[1].cancel()  # the engine's tick dying = a wedged supervisor
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert not engine.healthy()


@engine_test
async def test_budget_refuses_beyond_capacity_and_admits_when_a_slot_frees(
    make_engine: Callable[..., Any],
) -> None:
    # (8192 - model) // 2048 == 3 for any model + step peak under 2048 MB.
    engine = await make_engine(edge_diarization_memory_mb=8192, edge_diarization_session_mb=2048)
    await ready(engine)
    assert engine.capacity == 3
    sessions = [engine.open_session(f"s{i}") for i in range(4)]
    assert [s.state for s in sessions] == ["active", "active", "active", "refused"]
    fourth = sessions[3]
    assert fourth.reason is not None and "capacity" in fourth.reason and "8192" in fourth.reason
    assert engine.status.diarizer["sessions"] == 3 and engine.status.diarizer["capacity"] == 3
    talkers = [Talker(s, seed=i) for i, s in enumerate(sessions)]
    await asyncio.gather(*(t.talk(3.0) for t in talkers))
    assert fourth.timeline.covered_until == 0.0  # refused: no labels, audio dropped
    assert not await fourth.wait_covered(1.0, timeout=0.5)
    await sessions[0].close()
    assert fourth.state == "active"  # the freed slot goes to the waiting session at once
    await labels_flow(talkers[3])
    assert fourth.timeline.speaker_for(0.5, 1.0) == (None, 0.0)  # audio before admission
    assert engine.open_session("s4").state == "refused"


@engine_test
async def test_admission_stops_where_the_worker_could_not_keep_up(make_engine: Callable[..., Any]) -> None:
    # A slow device: warm-up steps of 0.7 s+ for 2 s chunks (RTF >= 0.35).
    engine = await make_engine(edge_diarization_max_rtf=0.9,
                               edge_diarization_faults="warmup_sleep:seconds=0.7,count=5")
    await ready(engine)
    f = dict(engine.figures)
    assert f["rtf"] >= 0.35 and f["memory_capacity"] > 50
    assert engine.capacity == f["compute_capacity"] == max(1, int(0.9 / f["rtf"])) <= 2
    sessions = [engine.open_session(f"s{i}") for i in range(engine.capacity + 1)]
    assert [s.state for s in sessions[:-1]] == ["active"] * engine.capacity
    assert sessions[-1].state == "refused"
    assert "keep up in real time on cpu" in (sessions[-1].reason or "")
    # The live steps are fast (no sleep outside warm-up): the next STATS raises the estimate
    # and the waiting session is admitted.
    talkers = [Talker(s, seed=i) for i, s in enumerate(sessions[:-1])]
    deadline = time.monotonic() + 60
    while sessions[-1].state != "active":
        assert time.monotonic() < deadline, "the live RTF never replaced the warm-up's"
        await asyncio.gather(*(t.talk(1.0) for t in talkers))
    assert engine.capacity >= len(sessions) and engine.figures["rtf_estimate"] < f["rtf"]


@engine_test
async def test_a_failing_step_degrades_that_session_then_its_labels_come_back(
    make_engine: Callable[..., Any],
) -> None:
    engine = await make_engine(edge_diarization_faults="step_raise:session=bad,after=5")
    await ready(engine)
    bad, good = engine.open_session("bad"), engine.open_session("good")
    tb, tg = Talker(bad), Talker(good, seed=1)
    await asyncio.gather(tb.talk(4.0), tg.talk(4.0))
    await until(lambda: ("degraded", "diarizer step failed: injected fault: step_raise") in bad.history,
                10, "the failing step to degrade the session")
    assert any("step failed" in n["message"] for n in engine.status.notices)
    await asyncio.gather(labels_flow(tb), labels_flow(tg))
    assert bad.state == good.state == "active"
    assert ("degraded", None) not in good.history and good.history[-1] == ("active", None)
    assert restarts(engine, "errors") == 0 and engine.worker_pid is not None


@engine_test
async def test_a_hung_step_degrades_then_the_stuck_worker_is_restarted(
    make_engine: Callable[..., Any],
) -> None:
    engine = await make_engine(stt_nemo_diarization_timeout_s=1.0,
                               edge_diarization_faults="step_sleep:session=s,after=20,seconds=60")
    await ready(engine)
    s = engine.open_session("s")
    talker = Talker(s)
    first_pid = engine.worker_pid
    while s.state == "active":
        await talker.talk(0.5)
    assert s.reason == "diarizer step slower than 1 s"
    assert engine.status.diarizer["state"] == "degraded"
    assert not await s.wait_covered(talker.t, timeout=1)  # labels null while degraded
    assert engine.healthy()  # the daemon keeps its watchdog going meanwhile
    # stuck after 3 x 1 s: killed and restarted; the session keeps going without labels
    await until(lambda: restarts(engine, "stuck") == 1, 10, "the stuck worker to be killed")
    assert s.state == "degraded" and "stuck" in (s.reason or "")
    while engine.state != "ready":  # audio keeps coming while the worker restarts
        await talker.talk(0.5)
    assert engine.worker_pid != first_pid
    await labels_flow(talker)
    assert s.state == "active" and engine.status.diarizer["restarts"] == 1


@engine_test
async def test_a_killed_worker_is_detected_at_once_restarted_and_labels_come_back(
    make_engine: Callable[..., Any],
) -> None:
    engine = await make_engine()
    await ready(engine)
    s = engine.open_session("s")
    talker = Talker(s)
    await labels_flow(talker)
    known = s.timeline.speakers
    assert known > 0
    pid = engine.worker_pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)  # what the OOM killer does
    t0 = time.monotonic()
    await until(lambda: s.state == "degraded", 2, "the session to notice the worker died")
    assert time.monotonic() - t0 < 1.0
    assert s.reason == "diarizer worker killed by SIGKILL; restarting"
    assert engine.status.diarizer["state"] == "degraded"
    late = engine.open_session("late")  # opened during the restart: waits for the new worker
    assert late.state == "unavailable" and late.reason == "diarizer restarting"
    while engine.state != "ready":
        await talker.talk(0.5)
    back = talker.t
    await labels_flow(talker)
    await talker.talk(2.0)
    # The new stream's speakers got new numbers: none of the old ones names a new voice.
    assert s.timeline.speakers > known
    assert s.timeline.speaker_for(back, talker.t - 0.5)[0] in (None, *range(known, s.timeline.speakers))
    assert late.state == "active"
    assert restarts(engine, "crash") == 1 and engine.worker_pid not in (None, pid)
    assert any("SIGKILL" in n["message"] for n in engine.status.notices)


@engine_test
async def test_worker_over_its_memory_budget_is_restarted(make_engine: Callable[..., Any]) -> None:
    # The tiny model's worker is ~0.7 GB; 1024 MB fits it and a few 64 MB sessions. The fault
    # leaks 800 MB in one step: far past 1024 + 102 MB.
    engine = await make_engine(edge_diarization_memory_mb=1024, edge_diarization_session_mb=64,
                               edge_diarization_faults="step_alloc:session=s,after=10,mb=800")
    await ready(engine)
    s = engine.open_session("s")
    talker = Talker(s)
    while restarts(engine, "memory") == 0:
        await talker.talk(0.5)
        assert talker.t < 60, "the worker was not restarted for its memory"
    while engine.state != "ready":
        await talker.talk(0.5)
    await labels_flow(talker)
    assert 0 < engine.worker.rss < 1024 * 2**20


@engine_test
async def test_a_corrupt_model_makes_the_diarizer_unavailable_not_the_daemon(
    make_engine: Callable[..., Any], tmp_path: Path,
) -> None:
    bad = tmp_path / "broken.nemo"
    bad.write_bytes(b"this is not a tar archive" * 100)
    engine = await make_engine(nemo_diar_model_path=bad)
    s = engine.open_session("s")
    await until(lambda: engine.state != "loading", 60, "the load to fail")
    assert engine.state == "unavailable"
    assert engine.reason is not None and "broken.nemo" in engine.reason
    assert s.state == "unavailable" and s.reason == engine.reason
    later = engine.open_session("later")
    assert later.state == "unavailable" and later.reason == engine.reason
    later.push(AudioBlock(0, b"\0\0" * 1600))  # harmless
    assert not await later.wait_covered(0.05, timeout=0.1)
    await later.close()
    assert engine.status.diarizer["state"] == "unavailable"
    assert engine.status.checks["nemo"].startswith("NeMo not available: ")
    assert engine.healthy()
    await until(lambda: engine.worker_pid is None, 10, "the worker to exit")
    assert engine.restarts == 0  # a model that cannot load is not retried in a loop


@pytest.mark.parametrize(("overrides", "why"), [
    ({"stt_enable_nemo_diarization_fallback": False}, "STT_ENABLE_NEMO_DIARIZATION_FALLBACK"),
    ({"edge_stt_diarization": "off"}, "EDGE_STT_DIARIZATION=off"),  # nobody labels speakers
    ({"edge_stt_diarization": "google"}, "EDGE_STT_DIARIZATION=google"),
])
async def test_disabled_fallback_spawns_nothing(tmp_path: Path, overrides: dict[str, Any],
                                                why: str) -> None:
    engine = DiarizationEngine(settings(tmp_path, **overrides), Status(max_sessions=4), Metrics())
    await engine.start()
    s = engine.open_session("x")
    assert s.state == "unavailable" and why in (s.reason or "")
    assert engine.worker_pid is None and engine.healthy()
    assert engine.status.checks["nemo"] == "disabled"
    await s.close()
    await engine.close()


def test_the_daemon_side_never_imports_torch_or_nemo() -> None:
    code = ("import sys, edge.diarization.engine, edge.diarization.session; "
            "bad = [m for m in ('torch', 'nemo') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


@engine_test
async def test_falling_behind_real_time_skips_to_the_newest_audio(make_engine: Callable[..., Any]) -> None:
    # One 4 s stall; 2 s of backlog allowed: the session skips ahead instead of queueing.
    engine = await make_engine(edge_diarization_max_backlog_s=2.0,
                               edge_diarization_faults="step_sleep:session=s,after=10,seconds=4")
    await ready(engine)
    s = engine.open_session("s")
    talker = Talker(s)
    while not s.feed.skipped:
        await talker.talk(0.5, speed=2.0)
        assert talker.t < 60, "never fell behind"
        assert s.feed.pending_samples <= 2.0 * SR + 0.1 * SR  # the backlog bound holds
    a, b = s.feed.skipped[0]
    assert s.state == "active"  # a stall shorter than the timeout: labels stay on
    assert not await s.wait_covered((a + b) / 2, timeout=5)  # skipped audio: no waiting
    await labels_flow(talker)
    assert s.timeline.speaker_for(a, b) == (None, 0.0)  # the skipped span stays unlabelled
    assert engine.metrics.queue_dropped.labels("diarizer")._value.get() == s.feed.skipped_frames > 0
    assert any("behind real time" in n["message"] for n in engine.status.notices)
    assert restarts(engine, "stuck") == 0


@engine_test
async def test_worker_protocol_directly(tiny_model: Path, tmp_path: Path) -> None:
    """The worker on its own: hello, load, open, audio -> frames, stats, errors, close, exit."""
    from edge.diarization import wire
    from edge.diarization.process import WorkerProcess
    from edge.diarization.wire import Kind

    proc = await WorkerProcess.spawn()
    try:
        hello = await proc.recv()
        assert hello is not None and hello.kind is Kind.HELLO and hello.meta["pid"] == proc.pid
        s = settings(tmp_path, nemo_diar_model_path=tiny_model)
        proc.send(Kind.LOAD, {"settings": s.model_dump(mode="json"), "generation": 0})
        phases = []
        while (msg := await proc.recv()) is not None and msg.kind is Kind.PROGRESS:
            phases.append(msg.meta["phase"])
        assert phases == ["import", "load", "warmup"]
        assert msg is not None and msg.kind is Kind.READY, msg
        assert {"model_rss", "step_peak", "session_bytes", "step_s", "device"} <= set(msg.meta)
        proc.send(Kind.OPEN, {"sid": "a/1"})
        assert (await proc.recv()) == wire.Message(Kind.OPENED, {"sid": "a/1"})
        audio = speechlike(3.0)
        proc.send(Kind.AUDIO, {"sid": "a/1", "seq": 1}, audio)
        frames = await proc.recv()
        assert frames is not None and frames.kind is Kind.FRAMES and frames.meta["seq"] == 1
        assert frames.meta["first"] == 0 and frames.array is not None and frames.array.shape[1] == 4
        proc.send(Kind.AUDIO, {"sid": "nope/0", "seq": 7}, audio[:100])
        err = await proc.recv()
        assert err is not None and err.kind is Kind.ERROR and err.meta["seq"] == 7
        proc.send(Kind.STATS)
        stats = await proc.recv()
        assert stats is not None and stats.kind is Kind.STATS_REPLY and stats.meta["streams"] == 1
        proc.send(Kind.CLOSE, {"sid": "a/1"})
        closed = await proc.recv()
        assert closed is not None and closed.kind is Kind.CLOSED and closed.array is not None
        assert closed.meta["first"] == len(frames.array)
        assert len(frames.array) + len(closed.array) == 38  # ceil(3 s / 80 ms): the tail is padded
        assert await proc.stop(grace=10) == 0
    finally:
        proc.kill()
        await proc.wait()


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


# --- issue 14: spawn, signals, isolation, what the worker inherits ---

@engine_test
async def test_a_worker_killed_by_a_realtime_signal_is_restarted(make_engine: Callable[..., Any]) -> None:
    """Signal 35 has no name in Python's `signal.Signals`: supervision must survive it."""
    engine = await make_engine(edge_api_keys="k-secret-1", edge_host="0.0.0.0")
    await ready(engine)
    s = engine.open_session("s")
    talker = Talker(s)
    await labels_flow(talker)
    pid = engine.worker_pid
    assert pid is not None
    os.kill(pid, 35)  # SIGRTMIN+1 on glibc (kill -35)
    await until(lambda: s.state == "degraded", 2, "the session to notice the worker died")
    assert s.reason == "diarizer worker killed by signal 35; restarting"
    while engine.state != "ready":
        await talker.talk(0.5)
    await labels_flow(talker)
    assert restarts(engine, "crash") == 1 and engine.worker_pid not in (None, pid)


def test_the_load_message_carries_no_api_key(tmp_path: Path) -> None:
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


@engine_test
def test_a_failed_spawn_is_retried_not_final(tiny_model: Path, tmp_path: Path) -> None:
    """A child daemon whose file descriptor limit is too low to make the worker's pipes
    (EMFILE, as under a flood of connections): the supervisor keeps retrying, and once the
    limit is back the worker starts."""
    code = f"""
import asyncio, json, os, resource
from edge.diarization.supervisor import WorkerSupervisor
from edge.metrics import Metrics
from tests.diarization_helpers import settings

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


@engine_test
@pytest.mark.timeout(480)
async def test_a_restart_reuses_the_warm_up_at_once_and_a_crash_loop_backs_off(
    make_engine: Callable[..., Any], tiny_model: Path, tmp_path: Path,
) -> None:
    """A worker that was ready is restarted at once the first time it dies, and its successor
    takes the warm-up figures instead of stepping the model; dying again right away is a crash
    loop and waits; after the model file is written the warm-up is measured again."""
    import shutil

    from edge.diarization.supervisor import BACKOFF_S
    from edge.diarization.worker.main import WARMUP_FIGURES

    model = tmp_path / "model.nemo"
    shutil.copy(tiny_model, model)
    engine = await make_engine(nemo_diar_model_path=model)
    await ready(engine, 180)
    first = dict(engine.figures)
    assert first["warmup_reused"] is False
    assert list(first["phases"]) == ["boot", "settings", "resolve", "plan", "open", "warmup"]
    assert sum(first["phases"].values()) <= first["spawn_to_ready_s"] + 0.01
    assert first["phases_cpu"]["boot"] > 0 and first["phases_cpu"]["warmup"] > 0

    async def kill_and_restart() -> dict[str, Any]:
        pid = engine.worker_pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        await until(lambda: engine.state == "degraded", 5, "the engine to see the worker die")
        await until(lambda: engine.state == "ready", 180, "the worker to be back")
        assert engine.worker_pid != pid
        return dict(engine.figures)

    second = await kill_and_restart()
    assert engine.worker.last_backoff_s == 0.0
    assert second["warmup_reused"] is True and "warmup" in second["phases"]
    assert {k: second[k] for k in WARMUP_FIGURES} == {k: first[k] for k in WARMUP_FIGURES}
    assert second["model_rss"] > 0  # measured by the new worker itself
    os.utime(model)  # written since (same bytes): its identity moved, so the figures may not hold
    third = await kill_and_restart()
    assert engine.worker.last_backoff_s == BACKOFF_S[0]  # the second quick death in a row
    assert third["warmup_reused"] is False
    assert restarts(engine, "crash") == 2


@engine_test
async def test_a_worker_ready_after_the_supervisor_gave_up_is_not_used(
    tiny_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    import logging

    from edge.diarization.supervisor import WorkerState, WorkerSupervisor

    caplog.set_level(logging.INFO, "edge.diarization")
    seen: list[str] = []

    class Recorder:
        def on_message(self, msg: Any) -> None: ...
        def on_ready(self, figures: dict[str, Any]) -> None: seen.append("ready")
        def on_lost(self, reason: str) -> None: seen.append(f"lost: {reason}")
        def on_final(self, reason: str) -> None: seen.append(f"final: {reason}")
        def on_progress(self) -> None: ...

    s = settings(tmp_path / "cache", nemo_diar_model_path=tiny_model,
                 edge_diarization_faults="warmup_sleep:seconds=1")
    sup = WorkerSupervisor(s, Metrics(), Recorder())
    task = sup.start()
    await until(lambda: sup.progress == "warmup", 120, "the worker to warm up")
    sup.give_up("the engine gave up")  # the worker still finishes its load and says READY
    await asyncio.wait_for(task, 30)
    assert seen == ["final: the engine gave up"]
    assert sup.state is WorkerState.FINAL and not sup.ready
    assert "diarizer worker ready while final: not used" in caplog.text
