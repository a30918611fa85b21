"""Benchmark what an ONNX worker's start pays to open its onnxruntime session: the optimized
graph cached as one file (weights inside, the layout before issue 11's restart work) against the
cache `open_session` keeps now (weights in a file of their own, mapped by onnxruntime).

    python scripts/bench/onnx_session.py --export DIR [--precision fp32] [--rounds 3]

DIR is an export folder (`edge model export`). Each variant is first built into a temporary
folder, then opened `--rounds` times, alternating, each in a fresh interpreter (as a worker
start is): wall and CPU seconds of `InferenceSession(...)`, RSS added by it, and after two steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from edge.diarization.exports import ONNX_FILES, read_marker  # noqa: E402
from scripts.bench.harness import emit  # noqa: E402

# Runs in a fresh interpreter: build (argv: build SRC DEST WEIGHTS|-) or open (argv: open PATH
# EMBEDDING_SIZE N_MELS), then two steps on a 2 s chunk with a full speaker cache and FIFO.
CHILD = """
import json, sys, time
import numpy as np
import onnxruntime as ort

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

def options(save_to=None, weights=None):
    o = ort.SessionOptions()
    o.inter_op_num_threads = 1
    o.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    o.log_severity_level = 3
    o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if save_to:
        o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        o.optimized_model_filepath = save_to
        if weights != "-":
            o.add_session_config_entry("session.optimized_model_external_initializers_file_name", weights)
    return o

if sys.argv[1] == "build":
    ort.InferenceSession(sys.argv[2], options(sys.argv[3], sys.argv[4]), providers=["CPUExecutionProvider"])
    sys.exit()
r0 = rss_mb()
t, c = time.perf_counter(), time.process_time()
s = ort.InferenceSession(sys.argv[2], options(), providers=["CPUExecutionProvider"])
wall, cpu = time.perf_counter() - t, time.process_time() - c
r1 = rss_mb()
d, mels = int(sys.argv[3]), int(sys.argv[4])  # the export's embedding size and mel bands
feed = {"chunk": np.random.rand(1, 216, mels).astype(np.float32), "chunk_lengths": np.array([216]),
        "spkcache": np.random.rand(1, 188, d).astype(np.float32), "spkcache_lengths": np.array([188]),
        "fifo": np.random.rand(1, 124, d).astype(np.float32), "fifo_lengths": np.array([124])}
for _ in range(2):
    s.run(None, feed)
print(json.dumps({"wall_s": wall, "cpu_s": cpu, "rss_mb": r1 - r0, "rss_after_steps_mb": rss_mb() - r0}))
"""


def child(*args: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", CHILD, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1]) if args[0] == "open" else {}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", type=Path, required=True, help="an export folder (edge model export)")
    ap.add_argument("--precision", choices=list(ONNX_FILES), default="fp32")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, help="write the JSON here too")
    args = ap.parse_args()
    src = args.export / ONNX_FILES[args.precision]
    marker = read_marker(args.export)
    dims = (str(marker["streaming"]["fc_d_model"]), str(marker["features"]["n_mels"]))
    result: dict[str, Any] = {"export": args.export.name, "precision": args.precision,
                              "loadavg_before": [round(x, 2) for x in os.getloadavg()]}
    with tempfile.TemporaryDirectory(prefix="edge-bench-ort-", dir=args.export.parent) as tmp:
        paths = {"one_file": Path(tmp, "one", "model.onnx"),
                 "mapped_weights": Path(tmp, "mapped", "model.onnx")}
        for name, path in paths.items():
            path.parent.mkdir()
            child("build", str(src), str(path), "-" if name == "one_file" else "weights.bin")
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in paths}
        for _ in range(args.rounds):
            for name, path in paths.items():
                runs[name].append(child("open", str(path), *dims))
    for name, rs in runs.items():
        result[name] = {k: round(statistics.median(r[k] for r in rs), 3) for k in rs[0]}
        result[name]["all"] = rs
    one, mapped = result["one_file"], result["mapped_weights"]
    result["ratio_mapped_vs_one_file"] = {k: round(mapped[k] / one[k], 2) for k in ("wall_s", "cpu_s")}
    result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    result["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
