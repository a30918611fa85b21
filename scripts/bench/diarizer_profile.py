#!/usr/bin/env python3
"""Where a streaming diarizer step's time goes, per runtime, at one thread count.

For each runtime (`--runtime onnx,nemo`) and ONNX precision (`--precision fp32,int8`) one child
process loads the diarizer through the worker's own `load_diarizer` and streams the audio
through one session in `--piece-ms` pieces, twice: once plain (the time to compare), once
profiled:

- the host side with cProfile, inclusive seconds of the parts a step is made of: features,
  chunk cutting, the network call (for ONNX: `InferenceSession.run`, and the feeding around
  it), the speaker-cache update (AOSC), folding;
- the network, per operator type: ONNX Runtime's own profiler (`enable_profiling`, node
  kernel times summed by op type) or torch's profiler (self CPU time per aten op).

    python scripts/bench/diarizer_profile.py --runtime onnx,nemo --precision fp32,int8 --threads 1

JSON out (`harness.emit`), with the command line that made it and the load average.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import os
import platform
import pstats
import shlex
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from scripts.bench.harness import emit  # noqa: E402

SR = 16000
# Host-side parts: (label, module file suffix, function name); inclusive cProfile seconds.
HOST_PARTS = {
    "onnx": [
        ("features", "numpy_features.py", "push"),
        ("features_finish", "numpy_features.py", "finish"),
        ("chunk_cutting", "stream_core.py", "chunks"),
        ("step_total", "onnx_streaming.py", "_step"),
        ("network_call", "onnx_streaming.py", "run_step"),
        ("session_run", "onnxruntime_inference_collection.py", "run"),
        ("cache_update", "speaker_cache.py", "streaming_update"),
        ("cache_compress", "speaker_cache.py", "_compress_spkcache"),
        ("topk_replay", "speaker_cache.py", "_torch_topk_set"),
        ("folding_observe", "stream_core.py", "observe"),
        ("folding_apply", "stream_core.py", "apply"),
    ],
    "nemo": [
        ("features", "worker/features.py", "push"),
        ("features_finish", "worker/features.py", "finish"),
        ("chunk_cutting", "stream_core.py", "chunks"),
        ("step_total", "worker/streaming.py", "_step"),
        ("forward_streaming_step", "sortformer_diar_models.py", "forward_streaming_step"),
        ("pre_encode", "subsampling.py", "forward"),
        ("frontend_encoder", "sortformer_diar_models.py", "frontend_encoder"),
        ("forward_infer", "sortformer_diar_models.py", "forward_infer"),
        ("cache_update", "sortformer_modules.py", "streaming_update"),
        ("cache_compress", "sortformer_modules.py", "_compress_spkcache"),
        ("folding_observe", "stream_core.py", "observe"),
        ("folding_apply", "stream_core.py", "apply"),
    ],
}


def stream(diarizer: Any, audio: Any, piece: int) -> tuple[float, int]:
    """One session over `audio` in `piece`-sample pieces; (wall seconds, steps run)."""
    session = diarizer.new_session()
    steps = 0
    step = session._step

    def counted(*a: Any, **k: Any) -> Any:
        nonlocal steps
        steps += 1
        return step(*a, **k)

    session._step = counted  # counts steps only; the runtime's own step runs unchanged
    t = time.perf_counter()
    for i in range(0, audio.size, piece):
        session.feed(audio[i : i + piece])
    session.finish()
    return time.perf_counter() - t, steps


def host_parts(prof: cProfile.Profile, runtime: str) -> dict[str, float]:
    """Inclusive seconds of each `HOST_PARTS` function (summed over matching entries)."""
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    out: dict[str, float] = {}
    for label, suffix, name in HOST_PARTS[runtime]:
        out[label] = sum(v[3] for (file, _line, func), v in stats.items()
                         if func == name and file.endswith(suffix))
    return out


def ort_ops(profile_json: Path) -> tuple[dict[str, float], float]:
    """ONNX Runtime profile -> (seconds per op type, sorted, largest first; model_run seconds)."""
    events = json.loads(profile_json.read_text())
    per: dict[str, float] = defaultdict(float)
    run = 0.0
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            per[e["args"]["op_name"]] += e["dur"] / 1e6
        elif e.get("cat") == "Session" and e.get("name") == "model_run":
            run += e["dur"] / 1e6
    return dict(sorted(per.items(), key=lambda kv: -kv[1])), run


def child(job: dict[str, Any]) -> dict[str, Any]:
    import soundfile

    from edge.diarization.worker.loading import load_diarizer
    from edge.settings import Settings

    settings = Settings(_env_file=None, nemo_cache_dir=Path(job["cache"]),  # type: ignore[call-arg]
                        nemo_diar_model_path=Path(job["model"]), edge_model_download=False,
                        edge_diarization_runtime=job["runtime"], edge_diarization_precision=job["precision"],
                        edge_diarization_threads=job["threads"], edge_diarization_device="cpu")
    params = settings.diarization_streaming_params()
    diarizer, _device, plan = load_diarizer(settings, Path(job["model"]), params)
    if plan.runtime != job["runtime"]:
        raise SystemExit(f"asked for {job['runtime']}, got {plan.describe()}")
    audio = soundfile.read(job["audio"], dtype="float32")[0]
    audio_s = audio.size / SR
    piece = SR * job["piece_ms"] // 1000
    stream(diarizer, audio[: SR * 4], piece)  # warm-up: first-call allocations
    plain, steps = stream(diarizer, audio, piece)
    result: dict[str, Any] = {"plan": plan.describe(), "steps": steps, "audio_s": audio_s,
                              "plain_s": plain, "plain_s_per_audio_s": plain / audio_s}
    prof = cProfile.Profile()
    with tempfile.TemporaryDirectory() as tmp:
        if job["runtime"] == "onnx":
            import onnxruntime as ort

            from edge.diarization.worker.onnx_streaming import optimized_path, session_options

            opts = session_options(job["threads"])
            opts.enable_profiling = True
            opts.profile_file_prefix = str(Path(tmp) / "ort")
            # The same optimized graph and options the runtime loaded, with ORT's profiler on.
            diarizer.session = ort.InferenceSession(
                str(optimized_path(plan.export.onnx, "cpu")), opts, providers=["CPUExecutionProvider"])
            stream(diarizer, audio[: SR * 4], piece)
            prof.enable()
            profiled, _ = stream(diarizer, audio, piece)
            prof.disable()
            ops, run = ort_ops(Path(diarizer.session.end_profiling()))
            result["ops_total_s"] = sum(ops.values())
            result["model_run_s"] = run
        else:
            import torch
            from torch.profiler import ProfilerActivity, profile

            prof.enable()
            profiled, _ = stream(diarizer, audio, piece)
            prof.disable()
            with profile(activities=[ProfilerActivity.CPU]) as tp:
                stream(diarizer, audio, piece)
            per = {e.key: e.self_cpu_time_total / 1e6 for e in tp.key_averages()}
            ops = dict(sorted(per.items(), key=lambda kv: -kv[1]))
            result["ops_total_s"] = sum(ops.values())
            result["torch_threads"] = torch.get_num_threads()
    result["profiled_s"] = profiled
    result["host"] = host_parts(prof, job["runtime"])
    top = list(ops.items())[: job["top"]]
    result["ops"] = {k: round(v, 4) for k, v in top}
    result["ops_share"] = {k: round(v / max(result["ops_total_s"], 1e-9), 4) for k, v in top}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=".nemo (default: the full random-weight model)")
    parser.add_argument("--audio", type=Path, help="16 kHz mono audio (default: synthesized speech)")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of the synthesized audio")
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "bench",
                        help="NEMO_CACHE_DIR holding the export (`edge model export`)")
    parser.add_argument("--runtime", default="onnx,nemo")
    parser.add_argument("--precision", default="fp32,int8", help="ONNX precisions")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--piece-ms", type=int, default=500)
    parser.add_argument("--top", type=int, default=15, help="op types listed per runtime")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    from scripts.bench.diarizer import speech_audio

    if args.model is None:
        from tests.fakes.sortformer import full_model_path

        args.model = full_model_path()
    audio = args.audio or speech_audio(args.seconds, args.cache)
    report: dict[str, Any] = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "loadavg_before": os.getloadavg()},
        "model": str(args.model), "audio": str(audio), "threads": args.threads, "runs": {},
    }
    for runtime in args.runtime.split(","):
        for precision in (args.precision.split(",") if runtime == "onnx" else ["fp32"]):
            job = {"runtime": runtime, "precision": precision, "threads": args.threads,
                   "model": str(args.model), "cache": str(args.cache), "audio": str(audio),
                   "piece_ms": args.piece_ms, "top": args.top}
            env = {**os.environ, "PYTHONWARNINGS": "ignore", "EDGE_ENV_FILE": os.devnull}
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], cwd=ROOT,
                                  capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise SystemExit(f"child failed ({runtime} {precision}):\n{proc.stderr[-4000:]}")
            label = f"onnx {precision}" if runtime == "onnx" else "nemo"
            report["runs"][label] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{label}: {report['runs'][label]['plain_s_per_audio_s']:.3f} s per audio s",
                  file=sys.stderr)
    report["machine"]["loadavg_after"] = os.getloadavg()
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        raise SystemExit(main())
