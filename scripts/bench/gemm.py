#!/usr/bin/env python3
"""The streaming step's weight products alone, one thread: ONNX Runtime's kernels against
torch's on the same shapes, to tell what the exported runtime's speed is bounded by.

Each product is `x @ W` with x of M rows (a full-cache step of the default preset: speaker
cache 188 + FIFO 125 + chunk 27 = 340 frames) and W a (K, N) weight of the full model:

- FastConformer (17 layers, d=512): feed-forward 512->2048 and 2048->512 (two of each per
  layer), attention projections 512->512 (four per layer), pointwise convolutions 512->1024
  and 512->512;
- Transformer (18 layers, d=192): projections 192->192 (four per layer), feed-forward
  192->768 and 768->192.

Per shape, median thread-CPU seconds per product over alternating repetitions, for:
`ort_fp32` (a MatMul, MLAS sgemm), `ort_int8` (the same graph through the export's own
int8 path: `quantize_int8`, i.e. ONNX Runtime's dynamic quantization with 7-bit weights, run as
DynamicQuantizeMatMul), `torch_fp32` (`torch.nn.functional.linear`, what NeMo's step runs)
and `torch_int8` (torch's dynamically quantized Linear, fbgemm). The step total weights each
shape by how many the step has.

    python scripts/bench/gemm.py --reps 30

JSON out (`harness.emit`), with the command line that made it and the load average.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from scripts.bench.harness import emit  # noqa: E402

M = 188 + 125 + 27
# (K, N): how many such products one step of the full model has.
SHAPES: dict[tuple[int, int], int] = {
    (512, 2048): 34, (2048, 512): 34, (512, 512): 68 + 17, (512, 1024): 17,
    (192, 192): 72, (192, 768): 18, (768, 192): 18,
}


def ort_products(k: int, n: int, w: np.ndarray, folder: Path) -> dict[str, Callable[[np.ndarray], Any]]:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edge.diarization.worker.onnx_streaming import session_options
    from edge.diarization.worker.quantize import quantize_int8

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="/encoder/product/MatMul")], "product",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])],
        [numpy_helper.from_array(w, "w")])
    fp32, int8 = folder / f"fp32-{k}x{n}.onnx", folder / f"int8-{k}x{n}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), fp32)
    quantize_int8(fp32, int8)
    out = {}
    for name, path in (("ort_fp32", fp32), ("ort_int8", int8)):
        session = ort.InferenceSession(str(path), session_options(1), providers=["CPUExecutionProvider"])
        out[name] = lambda x, s=session: s.run(["y"], {"x": x})[0]
    return out


def torch_products(w: np.ndarray) -> dict[str, Callable[[np.ndarray], Any]]:
    import torch

    linear = torch.nn.Linear(w.shape[0], w.shape[1], bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(w.T.copy()))
    quantized = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(linear), {torch.nn.Linear},
                                                       dtype=torch.qint8)

    def fp32(x: np.ndarray) -> Any:
        with torch.inference_mode():
            return torch.nn.functional.linear(torch.from_numpy(x), linear.weight).numpy()

    def int8(x: np.ndarray) -> Any:
        with torch.inference_mode():
            return quantized(torch.from_numpy(x)).numpy()

    return {"torch_fp32": fp32, "torch_int8": int8}


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    x_by_k = {k: rng.standard_normal((M, k), dtype=np.float32) for k in {k for k, _ in SHAPES}}
    report: dict[str, Any] = {"command": shlex.join([sys.executable, *sys.argv]),
                              "loadavg_before": os.getloadavg(), "rows": M, "torch": torch.__version__,
                              "shapes": {}}
    step: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for (k, n), count in SHAPES.items():
            w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
            products = {**ort_products(k, n, w, Path(tmp)), **torch_products(w)}
            x = x_by_k[k]
            want = x @ w
            cpu: dict[str, list[float]] = {name: [] for name in products}
            errors = {}
            for name, fn in products.items():  # warm-up, and the error against numpy
                got = fn(x)
                errors[name] = float(np.abs(got - want).max() / np.abs(want).max())
            names = list(products)
            for r in range(args.reps):
                for name in names if r % 2 == 0 else names[::-1]:
                    c0 = time.thread_time()
                    products[name](x)
                    cpu[name].append(time.thread_time() - c0)
            macs = M * k * n
            row = {}
            for name, times in cpu.items():
                med = statistics.median(times)
                row[name] = {"cpu_s": med, "gmac_per_s": round(macs / med / 1e9, 1),
                             "max_rel_error": errors[name]}
                step[name] = step.get(name, 0.0) + count * med
            row["per_step"] = count
            report["shapes"][f"{k}x{n}"] = row
    report["step_s"] = {name: round(s, 4) for name, s in step.items()}
    report["step_ratio"] = {"ort_fp32 / torch_fp32": round(step["ort_fp32"] / step["torch_fp32"], 3),
                            "ort_int8 / torch_fp32": round(step["ort_int8"] / step["torch_fp32"], 3),
                            "ort_int8 / torch_int8": round(step["ort_int8"] / step["torch_int8"], 3)}
    report["loadavg_after"] = os.getloadavg()
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
