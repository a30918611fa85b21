"""The ONNX Runtime diarizer (worker/onnx_streaming.py) against NeMo, on the tiny random-weight
model exported by `edge model export` (worker/export.py): the same probabilities as NeMo's
`model.forward()` on the whole file, the same folding decisions, int8 close to fp32, and the
runtime choice with its fallbacks.

Random weights prove equivalence, never accuracy.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge.diarization.model import ModelUnavailable
from tests.helpers.diarization import (
    SR,
    default_params,
    load_tiny_model,
    offline,
    random_sizes,
    run,
    settings,
    sizes,
    speechlike,
)
from tests.helpers.onnx import exported

pytestmark = [pytest.mark.nemo, pytest.mark.timeout(900)]

# Small cache/FIFO so that the speaker cache compresses many times within 45 s.
SMALL = {"chunk_len": 6, "chunk_left_context": 1, "chunk_right_context": 7, "fifo_len": 20,
         "spkcache_len": 40, "spkcache_update_period": 10}
MAX_DIFF = 1e-3  # issue 11: onnx fp32 vs NeMo forward()
INT8_AGREEMENT = 0.95


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, Path]:
    """(NeMo model, fp32 Export, .nemo path) for the tiny model."""
    from tests.fakes.sortformer import tiny_model_path

    export = exported(tiny_model_path())
    return load_tiny_model(tmp_path_factory.mktemp("cache")), export, tiny_model_path()


@pytest.fixture(scope="module")
def audio() -> np.ndarray:
    return speechlike(45.0)


def onnx_diarizer(export: Any, params: dict[str, int], **kw: Any) -> Any:
    from edge.diarization.worker.onnx_streaming import OnnxDiarizer

    return OnnxDiarizer(export, params, threads=1, **kw)


def preset_params(preset: str) -> dict[str, int]:
    return settings(Path("/nonexistent"), edge_diarization_preset=preset).diarization_streaming_params()


@pytest.mark.parametrize("pieces", ["0.1s", "0.5s", "3s", "random"])
@pytest.mark.parametrize("which", ["default", "small"])
def test_onnx_fp32_equals_nemo_forward(tiny: Any, audio: np.ndarray, pieces: str, which: str) -> None:
    model, export, _ = tiny
    params = default_params() if which == "default" else SMALL
    feed = random_sizes() if pieces == "random" else sizes(float(pieces[:-1]))
    got, _ = run(onnx_diarizer(export, params), audio, feed)
    want = offline(model, audio, params)
    assert got.shape == want.shape == (int(np.ceil(audio.size // 160 / 8)), 4)
    diff = float(np.abs(got - want).max())
    print(f"onnx fp32 vs NeMo forward, {which} params, {pieces} pieces: max abs diff {diff:.2e}")
    assert diff <= MAX_DIFF
    assert want.min() < 0.3 and want.max() > 0.7  # the model really discriminates frames


@pytest.mark.parametrize("preset", ["very-high", "high", "low", "ultra-low"])
def test_presets_equal_nemo_forward(tiny: Any, audio: np.ndarray, preset: str) -> None:
    model, export, _ = tiny
    params = preset_params(preset)
    clip = audio[: 25 * SR + 1234]  # a length that is not a whole number of frames
    got, _ = run(onnx_diarizer(export, params), clip, sizes(0.5))
    diff = float(np.abs(got - offline(model, clip, params)).max())
    print(f"onnx fp32 vs NeMo forward, preset {preset}: max abs diff {diff:.2e}")
    assert diff <= MAX_DIFF


def test_folding_decisions_are_the_same_on_both_runtimes(tiny: Any, audio: np.ndarray) -> None:
    from edge.diarization.worker.streaming import StreamingDiarizer

    model, export, _ = tiny
    nemo = StreamingDiarizer(model, SMALL, max_speakers=2)
    want, nemo_session = run(nemo, audio, sizes(0.5))
    nemo.close()
    got, onnx_session = run(onnx_diarizer(export, SMALL, max_speakers=2), audio, sizes(0.5))
    assert set(nemo_session.fold_map) == {2, 3}  # both extra slots spoke, so both were folded
    assert onnx_session.fold_map == nemo_session.fold_map
    assert not got[:, 2:].any() and not want[:, 2:].any()
    assert np.array_equal(got > 0.5, want > 0.5)
    assert np.abs(got - want).max() <= MAX_DIFF


def test_int8_decisions_agree_with_fp32(tiny: Any, audio: np.ndarray) -> None:
    from edge.diarization.exports import find_export

    _, export, model_path = tiny
    int8 = find_export(settings(Path("/nonexistent")), model_path, "int8", folder=export.folder)
    assert int8.onnx.name == "model.int8.onnx"
    params = default_params()
    fp32_probs, _ = run(onnx_diarizer(export, params), audio, sizes(0.5))
    int8_probs, _ = run(onnx_diarizer(int8, params), audio, sizes(0.5))
    same = (fp32_probs > 0.5) == (int8_probs > 0.5)
    agreement = float(np.mean(same.all(axis=1)))  # a frame agrees when all 4 slots' decisions do
    print(f"int8 vs fp32 decisions (p > 0.5) agree on {agreement:.1%} of frames "
          f"({np.mean(same):.1%} of frame-slots); max abs diff {np.abs(fp32_probs - int8_probs).max():.3f}")
    assert agreement >= INT8_AGREEMENT


def test_sessions_are_independent_and_warm_up_helpers_work(tiny: Any, audio: np.ndarray) -> None:
    model, export, _ = tiny
    d = onnx_diarizer(export, SMALL)
    a, b = d.new_session(), d.new_session()
    other = speechlike(20.0, seed=7)
    outs_a, outs_b = [], []
    for i in range(0, 20 * SR, 8000):  # interleaved, as the worker runs them
        outs_a.append(a.feed(audio[i : i + 8000]))
        outs_b.append(b.feed(other[i : i + 8000]))
    outs_a.append(a.finish())
    outs_b.append(b.finish())
    assert np.abs(np.concatenate(outs_a) - offline(model, audio[: 20 * SR], SMALL)).max() <= MAX_DIFF
    assert np.abs(np.concatenate(outs_b) - offline(model, other, SMALL)).max() <= MAX_DIFF
    fresh, filled = d.new_session(), d.new_session()
    fresh.feed(audio[: 2 * SR])
    filled.fill_caches()
    out = filled.feed(audio[: 2 * SR])
    assert len(out) and filled.state.spkcache.shape[1] == SMALL["spkcache_len"]  # compressed
    filled.fill_caches()  # the warm-up's per-session figure: never less than a young session's
    assert fresh.state_bytes() < filled.state_bytes()


def test_optimized_graph_is_cached_beside_the_export(tiny: Any, tmp_path: Path) -> None:
    from edge.diarization.exports import find_export
    from edge.diarization.worker.onnx_streaming import optimized_path

    _, shared, model_path = tiny
    shutil.copytree(shared.folder, tmp_path / "export", ignore=shutil.ignore_patterns("*.opt-*"))
    export = find_export(settings(tmp_path), model_path, "fp32", folder=tmp_path / "export")
    cached = optimized_path(export.onnx, "cpu")
    assert not cached.exists()
    onnx_diarizer(export, SMALL)
    assert cached.is_file() and cached.stat().st_size > 0
    mtime = cached.stat().st_mtime_ns
    onnx_diarizer(export, SMALL)  # a later start loads it instead of writing it again
    assert cached.stat().st_mtime_ns == mtime


def test_the_runtime_plan_takes_a_valid_export_and_falls_back_with_the_reason(
    tiny: Any, tmp_path: Path,
) -> None:
    from edge.diarization.runtime import plan_runtime

    _, export, model_path = tiny
    # The export lives in the model's export_dir (NEMO_CACHE_DIR/exported/...) for the finder.
    s = settings(tmp_path / "cache", nemo_diar_model_path=model_path)
    from edge.diarization.exports import export_dir

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


def test_an_int8_graph_that_does_not_load_is_unavailable_not_a_crash(tiny: Any, tmp_path: Path) -> None:
    """A graph that passes the marker's checks but that onnxruntime refuses (here: re-listed
    garbage with its true size and hash) gives one clear ModelUnavailable."""
    import json

    from edge.diarization.exports import MARKER, file_entry, find_export

    _, export, model_path = tiny
    folder = tmp_path / "export"
    shutil.copytree(export.folder, folder, ignore=shutil.ignore_patterns("*.opt-*"))
    (folder / "model.int8.onnx").write_bytes(b"\x08\x07not a protobuf graph" * 100)
    marker = json.loads((folder / MARKER).read_text())
    marker["files"]["model.int8.onnx"] = file_entry(folder / "model.int8.onnx")
    (folder / MARKER).write_text(json.dumps(marker))
    bad = find_export(settings(tmp_path / "cache"), model_path, "int8", folder=folder)
    with pytest.raises(ModelUnavailable, match="onnxruntime cannot load it"):
        onnx_diarizer(bad, SMALL)


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.skipif(os.environ.get("EDGE_TEST_FULL_MODEL") != "1",
                    reason="full 117.7M model: minutes to export and run; set EDGE_TEST_FULL_MODEL=1")
def test_full_model_fp32_equals_nemo_forward(tmp_path: Path) -> None:
    """The full 117.7M random-weight model (471 MB; minutes on 2 cores): default parameters."""
    from edge.diarization.model import resolve_model
    from edge.diarization.worker.loading import load_model
    from tests.fakes.sortformer import full_model_path

    path = full_model_path()
    s = settings(tmp_path / "cache", nemo_diar_model_path=path)
    model = load_model(resolve_model(s), s)
    export = exported(path, quantize=None)
    clip = speechlike(40.0)
    params = default_params()
    got, _ = run(onnx_diarizer(export, params), clip, sizes(0.5))
    diff = float(np.abs(got - offline(model, clip, params)).max())
    print(f"full model: onnx fp32 vs NeMo forward, default params: max abs diff {diff:.2e}")
    assert diff <= MAX_DIFF
