"""Benchmark the supervised diarizer worker: start and restart times, memory on each side,
per-session state, admission figures, step cost.

    python scripts/bench/diarizer_worker.py --model tiny --out bench-tiny.json
    python scripts/bench/diarizer_worker.py --model full --restarts 3 --out bench-full.json
    python scripts/bench/diarizer_worker.py --model /path/to/model.nemo
    python scripts/bench/diarizer_worker.py --model full --runtime onnx --precision int8 \
        --threads 2 --cache DIR        # DIR holds the export (`edge model export`); kept

This process plays the daemon: it runs the real `DiarizationEngine` (which spawns the real
worker) and never imports torch or NeMo itself; the random-weight test models are built in a
subprocess so that stays true. Timings on a shared machine are noisy: restarts are repeated
and the median reported.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from edge.clock import FRAME_S, SAMPLE_RATE, AudioBlock  # noqa: E402
from edge.diarization.engine import DiarizationEngine  # noqa: E402
from edge.diarization.wire import Kind  # noqa: E402
from edge.health import Status  # noqa: E402
from edge.metrics import Metrics  # noqa: E402
from edge.settings import Settings  # noqa: E402
from scripts.bench.harness import emit  # noqa: E402

MB = 2**20
SR = SAMPLE_RATE


def model_path(which: str) -> Path:
    if which in ("tiny", "full"):  # built (once, cached) in a child: torch stays out of here
        out = subprocess.run([sys.executable, "tests/fakes/sortformer.py", which], cwd=ROOT,
                             check=True, capture_output=True, text=True)
        return Path(out.stdout.strip().splitlines()[-1])
    return Path(which)


def audio(seconds: float) -> bytes:
    """Two alternating tones with pauses: enough for the speaker cache to fill."""
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * SR)) / SR
    f0 = np.where((t // 2.5) % 2 == 0, 140.0, 230.0)
    x = 0.2 * np.sin(2 * np.pi * f0 * t) * ((t % 2.5) < 2.0) + 0.01 * rng.standard_normal(t.size)
    return (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()


async def until(cond: Any, timeout: float) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError("benchmark step timed out")
        await asyncio.sleep(0.02)
    return time.monotonic() - t0


async def run(args: argparse.Namespace) -> dict[str, Any]:
    path = model_path(args.model)
    cache = args.cache or Path(tempfile.mkdtemp(prefix="edge-bench-"))
    settings = Settings(_env_file=None, nemo_diar_model_path=path, nemo_cache_dir=cache,  # type: ignore[call-arg]
                        edge_model_download=False, edge_diarization_memory_mb=args.budget_mb,
                        edge_diarization_runtime=args.runtime, edge_diarization_precision=args.precision,
                        edge_diarization_threads=args.threads)
    engine = DiarizationEngine(settings, Status(max_sessions=16), Metrics())
    out: dict[str, Any] = {"model": str(path), "model_file_mb": round(path.stat().st_size / MB, 1),
                           "budget_mb": args.budget_mb, "cpus": os.cpu_count(),
                           "runtime_asked": args.runtime, "precision_asked": args.precision,
                           "threads": args.threads,
                           "loadavg_before": [round(x, 2) for x in os.getloadavg()]}
    try:
        t0 = time.monotonic()
        await engine.start()
        start_return_s = time.monotonic() - t0
        await until(lambda: engine.state != "loading", 600)
        assert engine.state == "ready", (engine.state, engine.reason)
        out["cold_start_s"] = round(time.monotonic() - t0, 2)
        out["cold_hashed"] = engine.figures.get("hashed")
        out["runtime"] = {k: engine.figures.get(k) for k in ("runtime", "precision", "device")}
        out["start_returns_s"] = round(start_return_s, 4)
        f = engine.figures
        out["admission"] = {
            "model_rss_mb": round(f["model_rss"] / MB, 1), "step_peak_mb": round(f["step_peak"] / MB, 1),
            "warmup_session_bytes": f["session_bytes"], "per_session_reserved_mb": f["per_session"] // MB,
            "capacity": engine.capacity, "memory_capacity": f["memory_capacity"],
            "compute_capacity_warmup": f["compute_capacity"], "peak_exact": f["peak_exact"],
            "warmup_step_s": round(f["step_s"], 4), "warmup_rtf": round(f["rtf"], 4),
        }
        # One session through a minute of audio at the pace the worker keeps up with.
        s = engine.open_session("bench")
        pcm = audio(args.seconds)
        block = 2 * SR * 2  # 2 s of s16le
        t_audio = time.monotonic()
        for i in range(0, len(pcm), block):
            s.push(AudioBlock(i // 2, pcm[i:i + block]))
            await s.wait_covered((i + block) / 2 / SR - 3.0, 60)
        out["stream_wall_s"] = round(time.monotonic() - t_audio, 2)
        out["stream_audio_s"] = args.seconds
        engine.figures.pop("stats", None)  # a periodic reply may predate the stream
        engine.worker.send(Kind.STATS)
        await until(lambda: "stats" in engine.figures, 30)
        stats = engine.figures["stats"]
        out["session_state_bytes_after_stream"] = stats["state_bytes"]
        out["step_median_s"] = round(stats["step_median_s"], 4)
        out["step_max_s"] = round(stats["step_max_s"], 4)
        out["rtf_30s"] = engine.status.diarizer["rtf"]
        # If the machine was too busy the session degraded or skipped: the figures above are
        # then for a partly skipped stream. Say so rather than hide it.
        out["stream_skipped_s"] = round(s.feed.skipped_frames * FRAME_S, 2)
        out["stream_states"] = [state for state, _ in s.history]
        await s.close()
        out["rss_mb"] = {
            "daemon": round(psutil.Process().memory_info().rss / MB, 1),
            "worker": round(psutil.Process(engine.worker_pid).memory_info().rss / MB, 1),
            "daemon_imports_torch": "torch" in sys.modules,
        }
        # Restart: SIGKILL -> detected -> respawned -> loaded -> ready again.
        # The supervisor's backoff (1 s after a worker that ran < 60 s, doubling for a crash
        # loop) sits between detection and respawn; spawn -> ready is the load itself.
        times, detect, load = [], [], []
        for _ in range(args.restarts):
            pid = engine.worker_pid
            assert pid is not None
            t0 = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            detect.append(await until(lambda: engine.state == "degraded", 10))
            await until(lambda p=pid: engine.worker_pid not in (None, p), 120)
            t_spawn = time.monotonic()
            await until(lambda: engine.state == "ready", 600)
            times.append(time.monotonic() - t0)
            load.append(time.monotonic() - t_spawn)
            await asyncio.sleep(1.0)
        if times:
            out["restart_s"] = {"kill_to_ready_median": round(statistics.median(times), 2),
                                "kill_to_ready_all": [round(x, 2) for x in times],
                                "spawn_to_ready_median": round(statistics.median(load), 2),
                                "detect_median_ms": round(1000 * statistics.median(detect), 1),
                                # What the last restarted worker hashed itself vs took from its
                                # predecessor's verified digests (absent before issue 11's fix).
                                "last_hashed": engine.figures.get("hashed"),
                                "last_reused": engine.figures.get("reused")}
        out["compute_capacity_live"] = engine.figures.get("compute_capacity")
    finally:
        await engine.close()
        if args.cache is None:
            shutil.rmtree(cache, ignore_errors=True)  # the extracted model copy (~470 MB for full)
    out["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny | full | a .nemo path")
    ap.add_argument("--budget-mb", type=int, default=2048)
    ap.add_argument("--seconds", type=float, default=60.0, help="audio streamed through one session")
    ap.add_argument("--restarts", type=int, default=3)
    ap.add_argument("--runtime", choices=["auto", "onnx", "nemo"], default="auto",
                    help="EDGE_DIARIZATION_RUNTIME for the worker (default auto)")
    ap.add_argument("--precision", choices=["fp32", "int8"], default="fp32",
                    help="EDGE_DIARIZATION_PRECISION (default fp32)")
    ap.add_argument("--threads", type=int, default=0, help="EDGE_DIARIZATION_THREADS (default 0)")
    ap.add_argument("--cache", type=Path,
                    help="NEMO_CACHE_DIR to use and keep (default: a temp dir, deleted after)")
    ap.add_argument("--out", type=Path, help="write the JSON here too")
    args = ap.parse_args()
    result = asyncio.run(run(args))
    result["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
