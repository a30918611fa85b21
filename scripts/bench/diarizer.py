#!/usr/bin/env python3
"""Diarizer benchmark: the live engine vs NeMo's own offline `forward_streaming`, per preset.

For each streaming configuration (the hop/window mapping of the settings and every model-card
preset) one child process loads the model once and then alternates, on the same audio,

- nemo: `model.forward()` on the whole file (NeMo's features + `forward_streaming`), and
- live: `SessionStream.feed()` in `--piece-ms` pieces + `finish()` (what a session runs),

so both see the same machine state; each run starts from a trimmed heap with the peak-RSS
counter reset (/proc/self/clear_refs), so "peak RSS" is that run's own peak. It also measures
the seed's design (the whole model re-run on a 12 s window every 2 s) and the model load, from
the unpacked cache copy and with NeMo's stock `restore_from` (which unpacks to a temp dir).
Every child uses the same torch thread count. JSON out, with the command line that made it.

    python scripts/bench/diarizer.py --out bench.json            # full 117M random-weight model

Runtimes side by side (`--parts export,runtimes,worker`): the model's ONNX export is made (and
timed) with `edge model export`, then for every runtime (`--runtime onnx,nemo`), precision
(`--precision fp32,int8`, ONNX only) and thread count (`--threads 1,2`) one child loads the
diarizer through the worker's own `load_diarizer` and streams the audio through one session at
the default streaming parameters, in rounds that alternate the order; `worker` runs
`diarizer_worker.py` per runtime for the worker's RSS after load and SIGKILL-to-ready time.

    python scripts/bench/diarizer.py --parts export,runtimes,worker --runtime onnx,nemo \
        --precision fp32,int8 --threads 1,2 --out bench-runtimes.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from scripts.bench.harness import portable  # noqa: E402

SR = 16000
LINES = [  # two voices take turns, as in a meeting
    ("en-us", "Good morning everyone, let's start with the quarterly numbers."),
    ("en-gb+f3", "Thanks. Could you explain why the southern region stayed flat?"),
    ("en-us", "Sure. The new contract only started in March, so most of it lands next quarter."),
    ("en-gb+f3", "That makes sense. What about hiring, are we still on plan?"),
    ("en-us", "We hired four engineers and one designer, two roles are still open."),
    ("en-gb+f3", "Good. Let's move on to the product roadmap then."),
]


def speech_audio(seconds: float, cache: Path) -> Path:
    """Synthesize (once) two espeak-ng voices alternating, 16 kHz mono, `seconds` long."""
    import numpy as np
    import soundfile
    import soxr

    out = cache / f"meeting-{int(seconds)}s.wav"
    if out.is_file():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    parts, total, i = [], 0, 0
    with tempfile.TemporaryDirectory() as tmp:
        while total < seconds * SR:
            voice, text = LINES[i % len(LINES)]
            wav = Path(tmp) / f"{i}.wav"
            subprocess.run(["espeak-ng", "-v", voice, "-w", str(wav), text], check=True)
            data, rate = soundfile.read(wav, dtype="float32")
            data = soxr.resample(data, rate, SR)
            pause = np.zeros(int(SR * (0.2 + 0.3 * (i % 3))), dtype=np.float32)
            parts += [data, pause]
            total += data.size + pause.size
            i += 1
    audio = np.concatenate(parts)[: int(seconds * SR)]
    soundfile.write(out, audio, SR)
    return out


def configs() -> dict[str, dict[str, int]]:
    """The settings' hop/window mapping (default) and each model-card preset."""
    from edge.settings import DIARIZATION_PRESETS, Settings

    out = {"default (hop 2 s, window 12 s)": Settings(_env_file=None).diarization_streaming_params()}
    for name in DIARIZATION_PRESETS:
        out[name] = Settings(_env_file=None, edge_diarization_preset=name).diarization_streaming_params()
    return out


# --- child side: one process per measurement group ---

def _reset_peak() -> None:
    from edge.diarization.model import trim_memory

    trim_memory()
    with contextlib.suppress(OSError):  # "5" resets VmHWM (peak RSS) to the current RSS (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _io(field: str) -> int:
    """A counter of /proc/self/io (`wchar`: bytes this process wrote, whatever the device)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _load(job: dict[str, Any]) -> tuple[Any, float]:
    import torch
    from nemo.collections.asr.models import SortformerEncLabelModel  # import cost is not load cost

    from edge.diarization.worker.loading import load_model
    from edge.settings import Settings

    torch.set_num_threads(job["threads"])
    settings = Settings(_env_file=None, nemo_cache_dir=Path(job["cache"]))
    start = time.perf_counter()
    if job.get("stock"):
        model = SortformerEncLabelModel.restore_from(job["model"], map_location="cpu").eval()
    else:
        model = load_model(Path(job["model"]), settings, "cpu")
    return model, time.perf_counter() - start


def child(job: dict[str, Any]) -> dict[str, Any]:
    import soundfile
    import torch

    from edge.diarization.model import rss_bytes, trim_memory
    from edge.diarization.worker.streaming import StreamingDiarizer, apply_streaming_params

    _reset_peak()
    base = rss_bytes()
    written = _io("wchar")
    model, load_s = _load(job)
    result: dict[str, Any] = {"load_s": load_s, "peak_rss_load": _peak_rss(), "rss_before_load": base,
                              "bytes_written_by_load": _io("wchar") - written}
    trim_memory()
    result["rss_after_load"] = rss_bytes()
    if job["kind"] == "load":
        return result
    audio = soundfile.read(job["audio"], dtype="float32")[0]
    duration = audio.size / SR
    params = job["params"]

    def nemo() -> dict[str, Any]:
        apply_streaming_params(model, params)
        with torch.inference_mode():
            model.forward(audio_signal=torch.from_numpy(audio)[None],
                          audio_signal_length=torch.tensor([audio.size]))
        return {}

    def live() -> dict[str, Any]:
        diarizer = StreamingDiarizer(model, params)
        session = diarizer.new_session()
        piece = SR * job["piece_ms"] // 1000
        for i in range(0, audio.size, piece):
            session.feed(audio[i : i + piece])
        state = session.state_bytes()
        session.finish()
        return {"state_bytes": state}

    def seed() -> dict[str, Any]:
        # The seed's design: the whole model over the last `window` seconds, every `hop` seconds.
        apply_streaming_params(model, params)
        win, hop = int(job["seed_window"] * SR), int(job["seed_hop"] * SR)
        for end in range(hop, audio.size + 1, hop):
            clip = audio[max(0, end - win) : end]
            with torch.inference_mode():
                model.forward(audio_signal=torch.from_numpy(clip)[None],
                              audio_signal_length=torch.tensor([clip.size]))
        return {}

    # CPU time inside NeMo's streaming step, per run: both modes make the same step calls on the
    # same inputs (their outputs are identical), so what differs is the work around the steps.
    in_step = [0.0]
    step = model.forward_streaming_step

    def timed_step(*a: Any, **k: Any) -> Any:
        t = time.process_time()
        try:
            return step(*a, **k)
        finally:
            in_step[0] += time.process_time() - t

    model.forward_streaming_step = timed_step
    modes = {"nemo": nemo, "live": live} if job["kind"] == "pair" else {"seed": seed}
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    budget_end = time.perf_counter() + job["max_group_s"]
    for rep in range(job["repeats"]):
        order = list(modes.items())
        if rep % 2:
            order.reverse()  # A B B A ...: a drift in machine load hits both modes alike
        for name, fn in order:
            _reset_peak()
            in_step[0] = 0.0
            start, cpu = time.perf_counter(), time.process_time()
            extra = fn()
            took, cpu = time.perf_counter() - start, time.process_time() - cpu
            runs[name].append({"seconds": took, "cpu_s": cpu, "rtf": took / duration,
                               "step_cpu_s": in_step[0], "outside_cpu_s": cpu - in_step[0],
                               "peak_rss": _peak_rss(), **extra})
        if rep + 1 < job["repeats"] and time.perf_counter() > budget_end:
            break  # enough of a slow configuration; the JSON says how many repeats ran
    result.update({"audio_s": duration, "runs": runs})
    return result


def run_child(job: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({job['kind']}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def runtime_child(job: dict[str, Any]) -> dict[str, Any]:
    """One runtime at one thread count: load through the worker's `load_diarizer` (the ONNX one
    never imports torch), then stream the audio through a session in pieces, `repeats` times."""
    import numpy as np
    import soundfile

    from edge.diarization.model import rss_bytes, trim_memory
    from edge.diarization.worker.loading import load_diarizer
    from edge.settings import Settings

    settings = Settings(_env_file=None, nemo_cache_dir=Path(job["cache"]),  # type: ignore[call-arg]
                        nemo_diar_model_path=Path(job["model"]), edge_model_download=False,
                        edge_diarization_runtime=job["runtime"], edge_diarization_precision=job["precision"],
                        edge_diarization_threads=job["threads"], edge_diarization_device="cpu")
    params = settings.diarization_streaming_params()
    _reset_peak()
    start = time.perf_counter()
    diarizer, _device, plan = load_diarizer(settings, Path(job["model"]), params)
    load_s = time.perf_counter() - start
    if plan.runtime != job["runtime"]:
        raise SystemExit(f"asked for {job['runtime']}, got {plan.describe()}")
    trim_memory()
    result: dict[str, Any] = {"load_s": load_s, "rss_after_load": rss_bytes(), "params": params,
                              "plan": plan.describe(), "torch_imported": "torch" in sys.modules}
    audio = soundfile.read(job["audio"], dtype="float32")[0]
    piece = SR * job["piece_ms"] // 1000
    runs = []
    for _ in range(job["repeats"]):
        session = diarizer.new_session()
        out = []
        t, cpu = time.perf_counter(), time.process_time()
        for i in range(0, audio.size, piece):
            out.append(session.feed(audio[i : i + piece]))
        out.append(session.finish())
        took = time.perf_counter() - t
        runs.append({"seconds": took, "cpu_s": time.process_time() - cpu,
                     "s_per_audio_s": took / (audio.size / SR)})
        result["probs"] = np.concatenate(out).tolist()
    result.update(runs=runs, peak_rss=_peak_rss(), audio_s=audio.size / SR)
    return result


def run_export(model: Path, cache: Path, fresh: bool) -> dict[str, Any]:
    """`edge model export` then `edge model export --quantize int8` (as install.sh runs them),
    each timed; sizes on disk of the folder's files."""
    env = {**os.environ, "NEMO_CACHE_DIR": str(cache), "EDGE_ENV_FILE": os.devnull,
           "PYTHONWARNINGS": "ignore", "EDGE_MODEL_DOWNLOAD": "false"}
    if fresh:
        for old in (cache / "exported").glob(f"{model.stem}-*"):
            subprocess.run(["rm", "-rf", str(old)], check=True)
    out: dict[str, Any] = {}
    for label, extra in (("fp32", []), ("int8", ["--quantize", "int8"])):
        cmd = [sys.executable, "-m", "edge", "model", "export", "--model", str(model), *extra]
        t = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"export failed:\n{proc.stderr[-3000:]}")
        out[f"{label}_s"] = time.perf_counter() - t
        out[f"{label}_status"] = proc.stdout.strip().splitlines()[-1].split(":")[0]  # NeMo logs to stdout
        out[f"{label}_stderr"] = [line for line in proc.stderr.splitlines()
                                  if line.split(" ")[0] in ("fp32", "exported", "unchanged:")]
    folder = next((cache / "exported").glob(f"{model.stem}-*"))
    out["folder"] = str(folder)
    out["files_mb"] = {p.name: p.stat().st_size / 1e6 for p in sorted(folder.iterdir()) if p.is_file()}
    return out


def run_worker_bench(model: Path, cache: Path, runtime: str, precision: str, threads: int,
                     seconds: float, restarts: int) -> dict[str, Any]:
    """`diarizer_worker.py` (the real engine and worker) for one runtime: RSS, restart times."""
    cmd = [sys.executable, "scripts/bench/diarizer_worker.py", "--model", str(model), "--runtime", runtime,
           "--precision", precision, "--threads", str(threads), "--cache", str(cache),
           "--seconds", str(seconds), "--restarts", str(restarts)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        raise SystemExit(f"worker bench failed ({runtime} {precision}):\n{proc.stderr[-3000:]}")
    text = proc.stdout
    return json.loads(text[text.index("{"):])


def combos(runtimes: list[str], precisions: list[str]) -> list[tuple[str, str]]:
    """(runtime, precision) pairs to measure: NeMo once (it has no precision), ONNX per precision."""
    return [(r, p) for r in runtimes for p in (precisions if r == "onnx" else ["fp32"])]


def combo_label(runtime: str, precision: str) -> str:
    return f"onnx {precision}" if runtime == "onnx" else "nemo"


def compare_runtimes(args: argparse.Namespace, common: dict[str, Any]) -> dict[str, Any]:
    """Every (runtime, precision) at every thread count, in `--rounds` rounds of one child
    each, the order reversed every other round; ratios are paired within a round."""
    pairs = combos(args.runtime.split(","), args.precision.split(","))
    threads = [int(t) for t in str(args.threads).split(",")]
    rows: dict[str, list[dict[str, Any]]] = {}
    for rnd in range(args.rounds):
        jobs = [(r, p, t) for t in threads for r, p in pairs]
        for r, p, t in (jobs if rnd % 2 == 0 else jobs[::-1]):
            job = {**common, "kind": "runtime", "runtime": r, "precision": p, "threads": t, "repeats": 1}
            res = run_child(job)
            res["round"] = rnd
            rows.setdefault(f"{combo_label(r, p)} {t}t", []).append(res)
            print(f"round {rnd} {combo_label(r, p)} threads {t}: "
                  f"{res['runs'][0]['s_per_audio_s']:.4f} s per audio s, "
                  f"load {res['load_s']:.1f} s, RSS {res['rss_after_load'] / 2**20:.0f} MiB", file=sys.stderr)
    med = statistics.median
    agreement = decisions_agreement(rows)
    summary = {}
    for key, rs in rows.items():
        t = key.rsplit(" ", 1)[1]
        nemo = {x["round"]: x for x in rows.get(f"nemo {t}", [])}
        per = [x["runs"][0]["s_per_audio_s"] for x in rs]
        cpu = [x["runs"][0]["cpu_s"] / x["audio_s"] for x in rs]
        summary[key] = {
            "s_per_audio_s": med(per), "s_per_audio_s_all": per,
            "ratio_to_nemo": (med(x["runs"][0]["seconds"] / nemo[x["round"]]["runs"][0]["seconds"]
                                  for x in rs) if nemo else None),
            # CPU seconds of the process: at 1 thread the work itself, less shaken by a loaded
            # machine than wall time (which also counts waiting for a core).
            "cpu_s_per_audio_s": med(cpu),
            "cpu_ratio_to_nemo": (med(x["runs"][0]["cpu_s"] / nemo[x["round"]]["runs"][0]["cpu_s"]
                                      for x in rs) if nemo else None),
            "load_s": med(x["load_s"] for x in rs),
            "rss_after_load_mib": max(x["rss_after_load"] for x in rs) / 2**20,
            "peak_rss_mib": max(x["peak_rss"] for x in rs) / 2**20,
            "torch_imported": any(x["torch_imported"] for x in rs), "plan": rs[0]["plan"],
        }
    return {"params": rows[next(iter(rows))][0]["params"], "rounds": args.rounds, "summary": summary,
            "agreement": agreement, "runs": rows}


def decisions_agreement(rows: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Each runtime's probabilities against onnx fp32's at the same thread count (first round):
    the share of frames whose four decisions (p > 0.5) all agree, of frame-slots that agree,
    and the max abs difference. Removes the probabilities from `rows`."""
    import numpy as np

    out: dict[str, Any] = {}
    for key, rs in rows.items():
        name, t = key.rsplit(" ", 1)
        base = rows.get(f"onnx fp32 {t}")
        probs = np.array(rs[0]["probs"])
        if base is not None and name != "onnx fp32":
            ref = np.array(base[0]["probs"])
            same = (probs > 0.5) == (ref > 0.5)
            out[f"{key} vs onnx fp32"] = {"frames": float(same.all(axis=1).mean()),
                                          "frame_slots": float(same.mean()),
                                          "max_abs_diff": float(np.abs(probs - ref).max())}
    for rs in rows.values():
        for x in rs:
            x.pop("probs", None)
    return out


# --- parent ---

def summarize(name: str, params: dict[str, int], r: dict[str, Any]) -> dict[str, Any]:
    live = r["runs"]["live"]
    nemo = r["runs"]["nemo"]
    med = statistics.median
    return {
        "config": name,
        "params": params,
        "repeats": len(live),
        "rtf_live": med(x["rtf"] for x in live),
        "rtf_nemo": med(x["rtf"] for x in nemo),
        # Each live run is paired with the NeMo run next to it: the same machine state.
        "ratio_live_over_nemo": med(a["seconds"] / b["seconds"] for a, b in zip(live, nemo, strict=False)),
        # Other processes only ever add time: the fastest runs are the least disturbed.
        "ratio_min_live_over_nemo": min(x["seconds"] for x in live) / min(x["seconds"] for x in nemo),
        # The same NeMo steps (median CPU over all runs) plus each mode's own work around them:
        # the difference between the modes, without the machine's noise in the steps.
        "ratio_steps_plus_overhead": _structural_ratio(live, nemo),
        "outside_steps_cpu_s_live": med(x["outside_cpu_s"] for x in live),
        "outside_steps_cpu_s_nemo": med(x["outside_cpu_s"] for x in nemo),
        # CPU seconds are less disturbed by other processes on a shared machine.
        "ratio_cpu_live_over_nemo": med(a["cpu_s"] / b["cpu_s"] for a, b in zip(live, nemo, strict=False)),
        "peak_rss_live_mib": max(x["peak_rss"] for x in live) / 2**20,
        "peak_rss_nemo_mib": max(x["peak_rss"] for x in nemo) / 2**20,
        "session_state_bytes": live[-1]["state_bytes"],
        "rss_after_load_mib": r["rss_after_load"] / 2**20,
        "runs": r["runs"],  # every run, in the order it ran
    }


def _structural_ratio(live: list[dict[str, Any]], nemo: list[dict[str, Any]]) -> float:
    steps = statistics.median(x["step_cpu_s"] for x in live + nemo)
    return (steps + statistics.median(x["outside_cpu_s"] for x in live)) / (
        steps + statistics.median(x["outside_cpu_s"] for x in nemo)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="live diarizer vs NeMo offline streaming")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=".nemo to use (default: the full random-weight model)")
    parser.add_argument("--audio", type=Path, help="16 kHz mono audio (default: synthesized speech)")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the synthesized audio")
    parser.add_argument("--threads", default="2",
                        help="threads in every measurement; with the runtimes part a list, e.g. 1,2")
    parser.add_argument("--runtime", default="onnx,nemo", help="runtimes part: onnx,nemo")
    parser.add_argument("--precision", default="fp32,int8", help="runtimes part: ONNX precisions")
    parser.add_argument("--rounds", type=int, default=2, help="runtimes part: alternating rounds")
    parser.add_argument("--fresh-export", action="store_true",
                        help="export part: delete the bench cache's export first, so it is timed")
    parser.add_argument("--restarts", type=int, default=3, help="worker part: SIGKILL restarts")
    parser.add_argument("--worker-seconds", type=float,
                        help="worker part: audio streamed (default --seconds)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating live/NeMo pairs per config")
    parser.add_argument("--max-group-s", type=float, default=240.0,
                        help="stop repeating a config after this long (slow presets)")
    parser.add_argument("--piece-ms", type=int, default=500, help="piece size fed to the live engine")
    parser.add_argument("--only", nargs="*", help="config names to run (default: all)")
    parser.add_argument("--parts", default="load,pairs,seed", help="what to measure (default: all)")
    parser.add_argument("--out", type=Path, default=Path("bench-diarizer.json"))
    args = parser.parse_args(argv)
    if args.child:
        job = json.loads(args.child)
        print(json.dumps(runtime_child(job) if job["kind"] == "runtime" else child(job)))
        return 0

    from edge.diarization.model import extract_model
    from edge.settings import Settings

    cache = ROOT / ".cache" / "bench"
    if args.model is None:
        from tests.fakes.sortformer import full_model_path

        args.model = full_model_path()
    audio = args.audio or speech_audio(args.seconds, cache)
    extract_model(args.model, Settings(_env_file=None, nemo_cache_dir=cache))  # the unpacked copy
    first_threads = int(str(args.threads).split(",")[0])
    common = {"model": str(args.model), "cache": str(cache), "threads": first_threads,
              "audio": str(audio), "piece_ms": args.piece_ms, "repeats": args.repeats,
              "max_group_s": args.max_group_s, "seed_window": 12.0, "seed_hop": 2.0}
    report: dict[str, Any] = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "threads": args.threads, "loadavg_before": os.getloadavg()},
        "model": str(args.model), "audio": str(audio), "piece_ms": args.piece_ms,
    }
    print(f"model {args.model}, audio {audio}", file=sys.stderr)
    parts = set(args.parts.split(","))
    loads: dict[str, list[dict[str, Any]]] = {"unpacked_cache": [], "stock_restore_from": []}
    # Twice, alternating, so the first (cold page cache) run does not decide.
    for _ in range(2 if "load" in parts else 0):
        for label, stock in (("stock_restore_from", True), ("unpacked_cache", False)):
            r = run_child({**common, "kind": "load", "stock": stock})
            loads[label].append(r)
    report["load"] = {label: {"load_s": statistics.median(r["load_s"] for r in rs),
                              "load_s_all": [r["load_s"] for r in rs],
                              "peak_rss_mib": max(r["peak_rss_load"] for r in rs) / 2**20,
                              "rss_after_load_mib": max(r["rss_after_load"] for r in rs) / 2**20,
                              "mb_written": max(r["bytes_written_by_load"] for r in rs) / 1e6}
                      for label, rs in loads.items() if rs}
    print(f"load: {report['load']}", file=sys.stderr)
    rows = []
    for name, params in configs().items():
        if "pairs" not in parts or (args.only and name.split(" ")[0] not in args.only):
            continue
        r = run_child({**common, "kind": "pair", "params": params})
        row = summarize(name, params, r)
        row["audio_s"] = r["audio_s"]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    report["configs"] = rows
    seed_params = configs()["very-high"]
    if "seed" in parts:
        r = run_child({**common, "kind": "seed", "params": seed_params, "repeats": 1})
        report["seed_design"] = {
            "what": "whole model re-run on the last 12 s every 2 s (speaker numbers not kept across windows)",
            "params": seed_params, "rtf": r["runs"]["seed"][0]["rtf"],
            "peak_rss_mib": r["runs"]["seed"][0]["peak_rss"] / 2**20,
        }
        print(json.dumps(report["seed_design"]), file=sys.stderr)
    def save() -> None:  # after each part: a run cut short still leaves what it measured
        args.out.write_text(json.dumps(portable(report), indent=2) + "\n")

    if "export" in parts:
        report["export"] = run_export(args.model, cache, args.fresh_export)
        print(f"export: {report['export']}", file=sys.stderr)
        save()
    if "runtimes" in parts:
        report["runtimes"] = compare_runtimes(args, common)
        save()
    if "worker" in parts:
        report["worker"] = {}
        for r, p in combos(args.runtime.split(","), args.precision.split(",")):
            report["worker"][combo_label(r, p)] = run_worker_bench(
                args.model, cache, r, p, first_threads, args.worker_seconds or args.seconds, args.restarts)
            save()
    report["machine"]["loadavg_after"] = os.getloadavg()
    save()
    print(table(report))
    return 0


def table(report: dict[str, Any]) -> str:
    """The report as a Markdown table."""
    lines = ["| config | RTF live | RTF NeMo | live/NeMo: wall (median pair) | fastest runs | CPU | "
             "steps + own work | peak RSS live / NeMo (MiB) | state/session |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["configs"]:
        lines.append(f"| {r['config']} | {r['rtf_live']:.3f} | {r['rtf_nemo']:.3f} | "
                     f"{r['ratio_live_over_nemo']:.3f} | {r['ratio_min_live_over_nemo']:.3f} | "
                     f"{r['ratio_cpu_live_over_nemo']:.3f} | {r['ratio_steps_plus_overhead']:.4f} | "
                     f"{r['peak_rss_live_mib']:.0f} / "
                     f"{r['peak_rss_nemo_mib']:.0f} | {r['session_state_bytes'] / 1e6:.2f} MB |")
    if "seed_design" in report:
        s = report["seed_design"]
        lines.append(f"| seed: 12 s window every 2 s | {s['rtf']:.3f} | — | — | — | — | — | "
                     f"{s['peak_rss_mib']:.0f} | — |")
    if "runtimes" in report:
        lines += ["", "| runtime | threads | s per audio s | vs NeMo (paired) | CPU s per audio s | "
                  "CPU vs NeMo | load s | RSS after load MiB |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]

        def ratio(x: float | None) -> str:
            return f"{x:.2f}x" if x is not None else "—"

        for key, v in report["runtimes"]["summary"].items():
            name, t = key.rsplit(" ", 1)
            lines.append(f"| {name} | {t[:-1]} | {v['s_per_audio_s']:.4f} | {ratio(v['ratio_to_nemo'])} | "
                         f"{v['cpu_s_per_audio_s']:.4f} | {ratio(v['cpu_ratio_to_nemo'])} | "
                         f"{v['load_s']:.1f} | {v['rss_after_load_mib']:.0f} |")
    for name, w in report.get("worker", {}).items():
        lines.append(f"\nworker {name}: RSS {w['rss_mb']['worker']} MB, cold start {w['cold_start_s']} s, "
                     f"SIGKILL to ready {w.get('restart_s', {}).get('kill_to_ready_median')} s")
    if "export" in report:
        e = report["export"]
        lines.append(f"\nexport: fp32 {e['fp32_s']:.0f} s ({e['fp32_status']}), int8 {e['int8_s']:.0f} s "
                     f"({e['int8_status']}); files MB {e['files_mb']}")
    for label, v in report.get("load", {}).items():
        lines.append(f"\nload ({label}): {v['load_s']:.1f} s, RSS after load "
                     f"{v['rss_after_load_mib']:.0f} MiB, peak {v['peak_rss_mib']:.0f} MiB, "
                     f"{v.get('mb_written', 0):.0f} MB written")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
