"""The export marker's speaker-cache (AOSC) constants: `edge model export` records the
checkpoint's own `sortformer_modules` values, the ONNX runtime's numpy cache update uses them
(so a checkpoint that overrides NeMo's defaults still equals NeMo), and an older marker without
them falls back to NeMo's defaults with one log line and is made again by the next export.

The checkpoint is the tiny random-weight architecture with every AOSC constant set away from
NeMo's default, built by scripts/make_test_models.py's own `build`.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.helpers.diarization import offline, run, settings, sizes, speechlike

pytestmark = [pytest.mark.nemo, pytest.mark.timeout(900)]

# Away from SortformerModules' defaults (3, 0.25, 0.05, 0.2, 0.75, 1.5, 0.5), within their sense.
OVERRIDES = {"spkcache_sil_frames_per_spk": 2, "pred_score_threshold": 0.3, "scores_boost_latest": 0.1,
             "sil_threshold": 0.35, "strong_boost_rate": 0.5, "weak_boost_rate": 1.25,
             "min_pos_scores_rate": 0.3}
# Small cache/FIFO so that the speaker cache compresses many times within the clip.
SMALL = {"chunk_len": 6, "chunk_left_context": 1, "chunk_right_context": 7, "fifo_len": 20,
         "spkcache_len": 40, "spkcache_update_period": 10}


@pytest.fixture(scope="module")
def custom(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, Any]:
    """(.nemo path, its fp32 Export, the NeMo model) of a tiny checkpoint with OVERRIDES."""
    from edge.diarization.exports import find_export
    from edge.diarization.worker.export import export_model
    from edge.diarization.worker.loading import load_model
    from tests.fakes.sortformer import _builder

    root = tmp_path_factory.mktemp("aosc")
    builder = _builder()
    cfg = builder.tiny_config()
    cfg["sortformer_modules"].update(OVERRIDES)
    path = root / "aosc.nemo"
    builder.build(cfg, path)
    s = settings(root / "cache", nemo_diar_model_path=path)
    export_model(s, path, progress=lambda _line: None)
    return path, find_export(s, path, "fp32"), load_model(path, s)


def test_marker_records_the_checkpoints_aosc_constants(custom: tuple[Path, Any, Any]) -> None:
    from edge.diarization.worker.speaker_cache import AOSC_NAMES

    _, export, model = custom
    streaming = export.marker["streaming"]
    mods = model.sortformer_modules
    for name in AOSC_NAMES:
        assert streaming[name] == getattr(mods, name), name
    for name, value in OVERRIDES.items():
        assert streaming[name] == value, name


def test_runtime_uses_the_markers_constants_and_equals_nemo(custom: tuple[Path, Any, Any]) -> None:
    from edge.diarization.worker.onnx_streaming import OnnxDiarizer

    _, export, model = custom
    diarizer = OnnxDiarizer(export, SMALL, threads=1)
    for name, value in OVERRIDES.items():
        assert getattr(diarizer.cache_params, name) == value, name
    audio = speechlike(30.0)
    got, _ = run(diarizer, audio, sizes(0.5))
    want = offline(model, audio, SMALL)
    diff = float(np.abs(got - want).max())
    print(f"checkpoint with non-default AOSC constants: onnx fp32 vs NeMo forward max abs diff {diff:.2e}")
    assert diff <= 1e-3


def older_export(custom: tuple[Path, Any, Any], tmp_path: Path, edit: Callable[[dict[str, Any]], Any]
                 ) -> tuple[Any, Path]:
    """A copy of `custom`'s export where a daemon with cache `tmp_path/cache` finds it, its
    marker changed by `edit` as an older `edge model export` wrote it; (settings, folder)."""
    from edge.diarization.exports import MARKER, export_dir

    path, export, _ = custom
    s = settings(tmp_path / "cache", nemo_diar_model_path=path)
    folder = export_dir(s, path)
    shutil.copytree(export.folder, folder, ignore=shutil.ignore_patterns("*.opt-*"))
    marker = json.loads((folder / MARKER).read_text())
    edit(marker)
    (folder / MARKER).write_text(json.dumps(marker))
    return s, folder


def test_older_marker_falls_back_to_nemo_defaults_and_is_exported_again(
        custom: tuple[Path, Any, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from edge.diarization.exports import MARKER, find_export
    from edge.diarization.worker.export import export_model
    from edge.diarization.worker.onnx_streaming import OnnxDiarizer
    from edge.diarization.worker.speaker_cache import AOSC_NAMES, CacheParams

    path = custom[0]
    s, folder = older_export(custom, tmp_path,
                             lambda marker: [marker["streaming"].pop(name) for name in AOSC_NAMES])
    old = find_export(s, path, "fp32")  # still a valid export of this checkpoint
    with caplog.at_level(logging.WARNING, logger="edge.diarization.worker"):
        diarizer = OnnxDiarizer(old, SMALL, threads=1)
    lines = [r.getMessage() for r in caplog.records if "AOSC" in r.getMessage()]
    assert len(lines) == 1 and "sil_threshold" in lines[0] and "edge model export" in lines[0]
    defaults = CacheParams(n_spk=4, spkcache_len=SMALL["spkcache_len"], fifo_len=SMALL["fifo_len"],
                           spkcache_update_period=SMALL["spkcache_update_period"])
    assert diarizer.cache_params == defaults

    result = export_model(s, path, progress=lambda _line: None)
    assert result.status == "exported"  # not "unchanged": the marker lacked the constants
    again = json.loads((folder / MARKER).read_text())["streaming"]
    assert again["sil_threshold"] == OVERRIDES["sil_threshold"]


def test_marker_of_an_older_graph_warns_and_is_exported_again(
        custom: tuple[Path, Any, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from edge.diarization.exports import GRAPH_VERSION, MARKER, find_export
    from edge.diarization.worker.export import export_model
    from edge.diarization.worker.onnx_streaming import OnnxDiarizer

    path = custom[0]
    # As `edge model export` wrote it before graph versions.
    s, folder = older_export(custom, tmp_path, lambda marker: marker.pop("graph_version"))
    with caplog.at_level(logging.WARNING, logger="edge.diarization.worker"):
        OnnxDiarizer(find_export(s, path, "fp32"), SMALL, threads=1)  # still usable
    lines = [r.getMessage() for r in caplog.records if "graph version" in r.getMessage()]
    assert len(lines) == 1 and f"graph version 1, this edge makes {GRAPH_VERSION}" in lines[0]
    assert "edge model export" in lines[0]

    assert export_model(s, path, progress=lambda _line: None).status == "exported"  # not "unchanged"
    assert json.loads((folder / MARKER).read_text())["graph_version"] == GRAPH_VERSION


@pytest.mark.parametrize(("key", "value", "why"), [
    ("sil_threshold", "high", "must be a finite number, got 'high'"),
    ("spkcache_sil_frames_per_spk", 2.5, "must be an integer, got 2.5"),
    ("strong_boost_rate", None, "must be a finite number, got None"),
])
def test_bad_marker_constant_names_the_field(custom: tuple[Path, Any, Any], key: str, value: Any,
                                             why: str) -> None:
    from dataclasses import replace

    from edge.diarization.worker.onnx_streaming import OnnxDiarizer

    _, export, _ = custom
    marker = {**export.marker, "streaming": {**export.marker["streaming"], key: value}}
    with pytest.raises(ValueError, match=f"speaker-cache parameter {key} {why}"):
        OnnxDiarizer(replace(export, marker=marker), SMALL, threads=1)
