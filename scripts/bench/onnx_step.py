#!/usr/bin/env python3
"""ONNX graph variants of the streaming step side by side: one full-cache step (speaker cache
188, FIFO 125, one 2 s chunk with its context: the default preset's costliest step) run on
each graph in turn, alternating the order every repetition, in one process, one ONNX Runtime
thread. Reports per graph the median wall and thread-CPU seconds and their ratios to the first
graph, and the first graph's `preds` against each (max abs diff, share of equal decisions).

    python scripts/bench/onnx_step.py --reps 6 model.onnx model.int8.onnx variant.onnx

Thread CPU time is the figure to compare on a loaded machine: at one thread ORT runs the step
on the calling thread, and waiting for a core does not count.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from scripts.bench.harness import emit  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    import onnxruntime as ort

    from edge.diarization.worker.onnx_streaming import session_options

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("graphs", nargs="+", type=Path)
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    report = {"command": shlex.join([sys.executable, *sys.argv]), "loadavg_before": os.getloadavg(),
              "threads": args.threads, "graphs": {}}
    sessions = {}
    for g in args.graphs:
        t = time.perf_counter()
        sessions[g] = ort.InferenceSession(str(g), session_options(args.threads),
                                           providers=["CPUExecutionProvider"])
        report["graphs"][str(g)] = {"load_s": time.perf_counter() - t}
    rng = np.random.default_rng(0)
    s, f, t = 188, 125, 27 * 8
    feed = {"chunk": rng.standard_normal((1, t, 128), dtype=np.float32), "chunk_lengths": np.array([t]),
            "spkcache": rng.standard_normal((1, s, 512), dtype=np.float32), "spkcache_lengths": np.array([s]),
            "fifo": rng.standard_normal((1, f, 512), dtype=np.float32), "fifo_lengths": np.array([f])}
    base = sessions[args.graphs[0]].run(["preds"], feed)[0]
    wall: dict[Path, list[float]] = {g: [] for g in args.graphs}
    cpu: dict[Path, list[float]] = {g: [] for g in args.graphs}
    for r in range(args.reps):
        for g in args.graphs if r % 2 == 0 else args.graphs[::-1]:
            t0, c0 = time.perf_counter(), time.thread_time()
            preds = sessions[g].run(["preds"], feed)[0]
            wall[g].append(time.perf_counter() - t0)
            cpu[g].append(time.thread_time() - c0)
            entry = report["graphs"][str(g)]
            entry["max_abs_diff"] = float(np.abs(preds - base).max())
            entry["decisions_equal"] = float(((preds > 0.5) == (base > 0.5)).mean())
    med = statistics.median
    w0, c0 = med(wall[args.graphs[0]]), med(cpu[args.graphs[0]])
    for g in args.graphs:
        report["graphs"][str(g)].update(wall_s=med(wall[g]), cpu_s=med(cpu[g]), wall_ratio=med(wall[g]) / w0,
                                        cpu_ratio=med(cpu[g]) / c0, cpu_s_all=cpu[g])
    report["loadavg_after"] = os.getloadavg()
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
