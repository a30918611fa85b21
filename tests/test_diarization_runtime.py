"""Which runtime the worker will use (edge/diarization/runtime.py): the ONNX export when a valid
one is there, NeMo otherwise, and the reason for each fallback or refusal; on the tiny
random-weight model's real export."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from edge.diarization.exports import export_dir
from edge.diarization.model import ModelUnavailable
from edge.diarization.runtime import plan_runtime
from tests.helpers.diarization import settings
from tests.helpers.onnx import exported

pytestmark = [pytest.mark.nemo, pytest.mark.timeout(900)]


def test_the_runtime_plan_takes_a_valid_export_and_falls_back_with_the_reason(
    tiny_model: Path, tmp_path: Path,
) -> None:
    export, model_path = exported(tiny_model), tiny_model
    # The export lives in the model's export_dir (NEMO_CACHE_DIR/exported/...) for the finder.
    s = settings(tmp_path / "cache", nemo_diar_model_path=model_path)
    folder = export_dir(s, model_path)
    plan = plan_runtime(s, model_path)
    assert plan.runtime == "nemo" and "edge model export" in plan.note  # auto, nothing exported
    with pytest.raises(ModelUnavailable, match="EDGE_DIARIZATION_RUNTIME=onnx but no export"):
        plan_runtime(s.model_copy(update={"edge_diarization_runtime": "onnx"}), model_path)
    shutil.copytree(export.folder, folder, ignore=shutil.ignore_patterns("*.opt-*"))
    plan = plan_runtime(s, model_path)
    assert (plan.runtime, plan.precision, plan.export.onnx) == ("onnx", "fp32", folder / "model.onnx")
    int8 = plan_runtime(s.model_copy(update={"edge_diarization_precision": "int8"}), model_path)
    assert int8.export is not None and int8.export.onnx.name == "model.int8.onnx"
    nemo = plan_runtime(s.model_copy(update={"edge_diarization_runtime": "nemo"}), model_path)
    assert nemo.runtime == "nemo"
    # A truncated graph: auto falls back with the reason, onnx refuses with it.
    data = (folder / "model.onnx").read_bytes()
    (folder / "model.onnx").write_bytes(data[: len(data) // 2])
    plan = plan_runtime(s, model_path)
    assert plan.runtime == "nemo" and "truncated" in plan.note
    with pytest.raises(ModelUnavailable, match="truncated"):
        plan_runtime(s.model_copy(update={"edge_diarization_runtime": "onnx"}), model_path)
