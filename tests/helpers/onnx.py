"""ONNX exports of the random-weight test checkpoints, made once by `edge model export`'s library
call (`worker/export.py`, fp32 + int8) and kept under `<repo>/.cache/test-models/exported/`
(gitignored) like the checkpoints themselves; a later call finds them `unchanged`."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.sortformer import CACHE
from tests.helpers.diarization import settings


def exported(model_path: Path, quantize: str | None = "int8") -> Any:
    """The verified fp32 `Export` of `model_path` (exported first if needed, with `quantize`).
    Skips the test when the exporter is not installed (branch without worker/export.py)."""
    export_mod = pytest.importorskip("edge.diarization.worker.export")
    from edge.diarization.exports import find_export

    s = settings(CACHE)
    export_mod.export_model(s, model_path, quantize=quantize, progress=lambda _line: None)
    return find_export(s, model_path, "fp32")


def install_export(model_path: Path, cache_dir: Path) -> Path:
    """Copy the export of `model_path` to where a daemon with `NEMO_CACHE_DIR=cache_dir` looks
    for it (`export_dir`); returns that folder."""
    from edge.diarization.exports import export_dir

    source = exported(model_path).folder
    target = export_dir(settings(cache_dir), model_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.opt-*"))
    return target
