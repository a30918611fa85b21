"""The int8 export's graph preparation (worker/quantize.py) on a small hand-built graph of the
shapes the Sortformer export has: a weight shared through `Identity` (as the TorchScript exporter
writes equal weights), a Conformer-style convolution block (pointwise, depthwise, pointwise
Conv1d) and a MatMul of two activations. Checked with ONNX Runtime: the prepared graph computes
the same, and after quantization every weight product is int8."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

D, T = 16, 12


def block_graph(seed: int = 0) -> onnx.ModelProto:
    """x [1,T,D] -> MatMul(W) -> MatMul(shared W via Identity) -> conv block -> x·xᵀ·x -> head,
    named like the export's nodes (the head outside the encoder)."""
    rng = np.random.default_rng(seed)

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        values = rng.standard_normal(shape) / np.sqrt(shape[-1])
        return numpy_helper.from_array(values.astype(np.float32), name)

    inits = [weight("w", D, D), weight("pw1", 2 * D, D, 1), weight("pw1_b", 2 * D), weight("dw", D, 1, 3),
             weight("pw2", D, D, 1), weight("pw2_b", D), weight("head", D, D)]
    nodes = [
        helper.make_node("Identity", ["w"], ["w_shared"]),
        helper.make_node("MatMul", ["x", "w"], ["a"], name="/encoder/a/MatMul"),
        helper.make_node("MatMul", ["a", "w_shared"], ["b"], name="/encoder/b/MatMul"),
        helper.make_node("Transpose", ["b"], ["bt"], perm=[0, 2, 1]),
        helper.make_node("Conv", ["bt", "pw1", "pw1_b"], ["c1"], kernel_shape=[1], name="/encoder/pw1/Conv"),
        helper.make_node("Split", ["c1"], ["g1", "g2"], axis=1),
        helper.make_node("Sigmoid", ["g2"], ["s"]),
        helper.make_node("Mul", ["g1", "s"], ["glu"]),
        helper.make_node("Conv", ["glu", "dw"], ["c2"], kernel_shape=[3], pads=[1, 1], group=D,
                         name="/encoder/dw/Conv"),
        helper.make_node("Conv", ["c2", "pw2", "pw2_b"], ["c3"], kernel_shape=[1], name="/encoder/pw2/Conv"),
        helper.make_node("Transpose", ["c3"], ["y"], perm=[0, 2, 1]),
        helper.make_node("Transpose", ["y"], ["yt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["y", "yt"], ["scores"], name="/encoder/scores/MatMul"),
        helper.make_node("MatMul", ["scores", "y"], ["h"], name="/encoder/context/MatMul"),
        helper.make_node("MatMul", ["h", "head"], ["out"], name="/transformer_encoder/head/MatMul"),
    ]
    graph = helper.make_graph(
        nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "t", D])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, "t", D])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["out"], {"x": x})[0]


def test_prepared_graph_computes_the_same(tmp_path: Path) -> None:
    from edge.diarization.worker.quantize import prepare_for_int8

    model = block_graph()
    onnx.save(model, tmp_path / "fp32.onnx")
    counts = prepare_for_int8(model)
    assert counts == {"identity_bypassed": 1, "pointwise_conv_as_matmul": 2}
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    assert "Identity" not in ops and ops.count("Conv") == 1  # the depthwise one stays a Conv
    assert {t.name for t in model.graph.initializer} >= {"w", "dw"}
    assert not {"pw1", "pw2"} & {t.name for t in model.graph.initializer}  # replaced, not kept twice
    onnx.save(model, tmp_path / "prepared.onnx")
    x = np.random.default_rng(1).standard_normal((1, T, D)).astype(np.float32)
    want = run(tmp_path / "fp32.onnx", x)
    got = run(tmp_path / "prepared.onnx", x)
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, float(np.abs(want).max()))


def test_quantized_graph_has_every_weight_product_in_int8(tmp_path: Path) -> None:
    from edge.diarization.worker.quantize import quantize_int8

    onnx.save(block_graph(), tmp_path / "fp32.onnx")
    counts = quantize_int8(tmp_path / "fp32.onnx", tmp_path / "int8.onnx")
    assert counts["identity_bypassed"] == 1 and counts["pointwise_conv_as_matmul"] == 2
    assert sorted(p.name for p in tmp_path.glob("*.onnx")) == ["fp32.onnx", "int8.onnx"]  # no scratch left
    model = onnx.load(tmp_path / "int8.onnx")
    weights = {t.name for t in model.graph.initializer}
    float_weight_products = [(n.op_type, n.input[1]) for n in model.graph.node
                             if n.op_type in ("MatMul", "Conv") and n.input[1] in weights]
    # Only the depthwise convolution stays fp32: every MatMul weight, encoder or not, is int8,
    # in the 7-bit range (the module docstring says why).
    assert float_weight_products == [("Conv", "dw")]
    assert sum(n.op_type == "MatMulInteger" for n in model.graph.node) == 5  # w, w_shared, pw1, pw2, head
    int8_weights = [numpy_helper.to_array(t) for t in model.graph.initializer
                    if t.data_type == TensorProto.INT8]
    assert len(int8_weights) >= 4 and all(np.abs(w.astype(int)).max() <= 64 for w in int8_weights)
    x = np.random.default_rng(2).standard_normal((1, T, D)).astype(np.float32)
    want, got = run(tmp_path / "fp32.onnx", x), run(tmp_path / "int8.onnx", x)
    assert 0 < np.abs(got - want).max() <= 0.1 * float(np.abs(want).max())  # int8-close, not equal
