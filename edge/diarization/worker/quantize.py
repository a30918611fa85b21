"""The int8 export: ONNX Runtime's dynamic quantization of the exported fp32 step (worker side:
onnx, onnxruntime).

Before quantizing, the graph is rewritten so that the quantizer reaches every weight product:

- The TorchScript exporter stores a weight that several layers hold equal values for once and
  feeds the others through `Identity` nodes; the quantizer only quantizes a MatMul whose weight
  input is an initializer, so those MatMuls stayed fp32. Each such `Identity` is bypassed.
- The Conformer convolution module's pointwise convolutions (1-D, kernel 1) become
  Transpose-MatMul-Add-Transpose, which dynamic quantization covers as MatMuls
  (ONNX Runtime's `ConvInteger`, the quantizer's form for Conv, ran slower than fp32 here);
  ONNX Runtime's transpose optimizer cancels the transposes against the module's own.

Every weight product of the step is quantized: the FastConformer encoder, the Transformer
and the speaker head. The weights use 7 bits (`reduce_range`). On x86 CPUs without VNNI (AVX2,
as on this project's test machine) ONNX Runtime's u8 x s8 kernels sum pairs of products in
16 bits (`vpmaddubsw`), which saturates with full-range 8-bit weights. With 8 bits, quantizing
only the encoder already moved a speaker probability by up to 0.18 on the full random-weight
model, and quantizing the Transformer too flipped one speaker slot's decision on every frame.
With 7 bits, all of it quantized stays within 0.011 of fp32 on the same audio (100 % of
frames' decisions agree), and the step is faster (`scripts/bench/diarizer.py`; README).
On kernels that do not saturate (VNNI, ARM's dot-product instructions) the cost is one bit
of weight precision (not measured there).

Quantization is per tensor, signed weights, activations quantized per call (no calibration
data needed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper


def prepare_for_int8(model: onnx.ModelProto) -> dict[str, int]:
    """Rewrite `model` in place as the module docstring says; returns how many `Identity`
    nodes were bypassed and pointwise convolutions rewritten. The function computed is the same
    (a MatMul and a kernel-1 Conv sum the same products)."""
    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    alias = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity" and n.input[0] in weights}
    nodes: list[onnx.NodeProto] = []
    convs = 0
    for node in graph.node:
        if node.op_type == "Identity" and node.output[0] in alias:
            continue
        for i, name in enumerate(node.input):
            node.input[i] = alias.get(name, name)
        if _pointwise_conv(node, weights):
            nodes.extend(_conv_as_matmul(node, weights, graph))
            convs += 1
        else:
            nodes.append(node)
    outputs = {o.name for o in graph.output}
    # A graph output fed by a bypassed Identity keeps its Identity.
    kept = [helper.make_node("Identity", [src], [out]) for out, src in alias.items() if out in outputs]
    del graph.node[:]
    graph.node.extend(nodes + kept)
    used = {name for node in graph.node for name in node.input}
    unused = [t for t in graph.initializer if t.name not in used]
    for t in unused:
        graph.initializer.remove(t)
    return {"identity_bypassed": len(alias), "pointwise_conv_as_matmul": convs}


def quantize_int8(fp32: Path, int8: Path) -> dict[str, int]:
    """Write `int8` from the fp32 graph at `fp32`: `prepare_for_int8`, then dynamic quantization
    of every MatMul with a weight (QInt8, 7-bit range: the module docstring says why). A scratch copy of
    the prepared graph is kept beside `int8` while the quantizer runs. Returns
    `prepare_for_int8`'s counts. Raises what onnx and the quantizer raise (an `OSError` for a
    failed write of the scratch copy)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(fp32)
    counts = prepare_for_int8(model)
    scratch = int8.with_name(f".{int8.stem}.prepared.onnx")
    try:
        onnx.save(model, scratch)
        del model
        quantize_dynamic(scratch, int8, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                         reduce_range=True)
    finally:
        scratch.unlink(missing_ok=True)
    return counts


def compare_onnx(a: Path, b: Path) -> float:
    """Max abs diff of `preds` between two ONNX files of the step on a short random step."""
    import onnxruntime as ort

    sa = ort.InferenceSession(str(a), providers=["CPUExecutionProvider"])
    sb = ort.InferenceSession(str(b), providers=["CPUExecutionProvider"])
    shapes = {i.name: i.shape for i in sa.get_inputs()}
    n_mels, d = shapes["chunk"][2], shapes["spkcache"][2]
    rng = np.random.default_rng(0)
    feed = {"chunk": rng.standard_normal((1, 64, n_mels), dtype=np.float32),
            "chunk_lengths": np.array([64]), "spkcache": rng.standard_normal((1, 16, d), dtype=np.float32),
            "spkcache_lengths": np.array([16]), "fifo": rng.standard_normal((1, 8, d), dtype=np.float32),
            "fifo_lengths": np.array([8])}
    return float(np.abs(sa.run(["preds"], feed)[0] - sb.run(["preds"], feed)[0]).max())


def _pointwise_conv(node: onnx.NodeProto, weights: dict[str, onnx.TensorProto]) -> bool:
    """A 1-D Conv with a constant (O, C, 1) weight, one group, stride 1, no padding or dilation."""
    if node.op_type != "Conv" or node.input[1] not in weights:
        return False
    dims = list(weights[node.input[1]].dims)
    attrs: dict[str, Any] = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return (len(dims) == 3 and dims[2] == 1 and attrs.get("group", 1) == 1
            and all(v == 1 for v in attrs.get("strides", [1]) + attrs.get("dilations", [1]))
            and not any(attrs.get("pads", [0, 0]))
            and attrs.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET"))


def _conv_as_matmul(node: onnx.NodeProto, weights: dict[str, onnx.TensorProto],
                    graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Conv(x [B,C,T], W [O,C,1], b) as Transpose(MatMul(Transpose(x), W^T) + b)."""
    base = node.name or node.output[0]
    w = numpy_helper.to_array(weights[node.input[1]])[:, :, 0].T.copy()  # (C, O)
    w_name = f"{node.input[1]}.as_matmul"
    if w_name not in weights:
        weights[w_name] = numpy_helper.from_array(w, w_name)
        graph.initializer.append(weights[w_name])
    t_in, product, biased = f"{base}.t_in", f"{base}.matmul", f"{base}.bias"
    out = [helper.make_node("Transpose", [node.input[0]], [t_in], perm=[0, 2, 1], name=f"{base}.T_in"),
           helper.make_node("MatMul", [t_in, w_name], [product], name=f"{base}.MatMul")]
    last = product
    if len(node.input) > 2 and node.input[2]:
        out.append(helper.make_node("Add", [product, node.input[2]], [biased], name=f"{base}.Add"))
        last = biased
    out.append(helper.make_node("Transpose", [last], [node.output[0]], perm=[0, 2, 1], name=f"{base}.T_out"))
    return out


__all__ = ["compare_onnx", "prepare_for_int8", "quantize_int8"]
