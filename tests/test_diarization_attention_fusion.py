"""The attention fusion of the exported step (worker/attention_fusion.py): on the tiny
random-weight model's export every FastConformer and Transformer attention block becomes one
`MultiHeadAttention`, and the fused graph still computes NeMo's step (the torch wrapper) on full,
empty and batched-with-padding caches. Equality with NeMo's whole-file `forward()` through the
runtime is in test_diarization_onnx.py; the batched rows in test_diarization_export.py."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    """(NeMo model, fp32 Export) of the tiny model."""
    from tests.fakes.sortformer import tiny_model_path
    from tests.helpers.diarization import load_tiny_model
    from tests.helpers.onnx import exported

    return load_tiny_model(tmp_path_factory.mktemp("cache")), exported(tiny_model_path())


@pytest.mark.nemo
def test_every_attention_block_of_the_export_is_fused(tiny: tuple[Any, Any]) -> None:
    model, export = tiny
    graph = onnx.load(export.onnx)
    ops = Counter(n.op_type for n in graph.graph.node)
    layers = len(model.encoder.layers), len(model.transformer_encoder.layers)
    assert layers[0] >= 2 and layers[1] >= 2
    assert ops["MultiHeadAttention"] == sum(layers)
    assert ops["Softmax"] == 0
    assert export.marker["graph_version"] == 2


@pytest.mark.nemo
@pytest.mark.parametrize("fill", ["full", "empty", "partial"])
def test_fused_graph_computes_the_torch_step(tiny: tuple[Any, Any], fill: str) -> None:
    import torch

    from edge.diarization.worker.export import StepGraph, example_step, verify_step

    model, export = tiny
    step = list(example_step(model, seed=3))
    if fill != "full":  # speaker cache and FIFO emptied or cut short, as early in a session
        keep = 0 if fill == "empty" else 5
        for i in (2, 4):
            step[i] = step[i][:, :keep]
            step[i + 1] = torch.tensor([keep])
    graph = StepGraph(model).eval()
    try:
        diff = verify_step(graph, export.onnx, tuple(step))
    finally:
        graph.close()
    assert diff <= 1e-4


def plain_graph() -> onnx.ModelProto:
    """x -> MatMul -> Softmax -> MatMul: a softmax that is no attention block."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"]),
             helper.make_node("Softmax", ["a"], ["p"], axis=-1),
             helper.make_node("MatMul", ["p", "w"], ["y"])]
    g = helper.make_graph(nodes, "plain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8])], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_a_graph_without_attention_blocks_is_left_alone(tmp_path: Path) -> None:
    from edge.diarization.worker.attention_fusion import fuse_attention, fuse_attention_file

    model = plain_graph()
    before = model.SerializeToString()
    assert fuse_attention(model) == {"rel_pos_attention": 0, "attention": 0}
    assert model.SerializeToString() == before
    path = tmp_path / "plain.onnx"
    onnx.save(model, path)
    stamp = path.stat().st_mtime_ns
    assert fuse_attention_file(path) == {"rel_pos_attention": 0, "attention": 0}
    assert path.stat().st_mtime_ns == stamp  # not rewritten
