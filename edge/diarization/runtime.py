"""Which runtime the diarizer worker uses for a model (daemon side: no torch, NeMo, onnxruntime).

`EDGE_DIARIZATION_RUNTIME`: `nemo` always NeMo; `onnx` the verified ONNX export of the resolved
model in `EDGE_DIARIZATION_PRECISION`, or unavailable with the reason; `auto` the export when
there is a valid one, else NeMo with a note on how to make one. The worker, `edge diarize` and
`edge check` all decide with `plan_runtime`, so they agree.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from edge.diarization.exports import Export, find_export
from edge.diarization.model import ModelUnavailable
from edge.settings import Settings

EXPORT_HINT = "run `edge model export` (and `--quantize int8` for int8) for the lighter ONNX runtime"


@dataclass(frozen=True)
class RuntimePlan:
    """The decision: `runtime`, the export's `precision` (None on NeMo), the verified `export`
    (None on NeMo), and `note`: why NeMo was chosen under `auto` ("" otherwise)."""

    runtime: Literal["onnx", "nemo"]
    precision: str | None
    export: Export | None
    note: str = ""

    def describe(self) -> str:
        """One line for logs and `edge check`: `onnx int8 (<folder>)` or `nemo (<note>)`."""
        if self.runtime == "onnx":
            assert self.export is not None
            return f"onnx {self.precision} ({self.export.onnx})"
        return f"nemo ({self.note})" if self.note else "nemo"


def plan_runtime(settings: Settings, model_path: Path | None, check_hashes: bool = True) -> RuntimePlan:
    """Decide the runtime for the checkpoint at `model_path` (None: not resolved yet).

    Raises `ModelUnavailable` with one line when `EDGE_DIARIZATION_RUNTIME=onnx` and no valid
    export (or no onnxruntime) is there. `check_hashes=False` skips hashing the export's files
    (sizes are still checked), for quick checks.
    """
    want = settings.edge_diarization_runtime
    precision = settings.edge_diarization_precision
    if want == "nemo":
        return RuntimePlan("nemo", None, None, "EDGE_DIARIZATION_RUNTIME=nemo")
    if importlib.util.find_spec("onnxruntime") is None:
        reason = "onnxruntime is not installed"
        export = None
    else:
        try:
            export = (find_export(settings, model_path, precision, check_hashes=check_hashes)
                      if model_path is not None else None)
            reason = "" if export is not None else "no model to match an export against"
        except ModelUnavailable as exc:
            export, reason = None, str(exc)
    if export is not None:
        return RuntimePlan("onnx", precision, export)
    if want == "onnx":
        raise ModelUnavailable(f"EDGE_DIARIZATION_RUNTIME=onnx but {reason}")
    hint = "" if "edge model export" in reason else f"; {EXPORT_HINT}"
    return RuntimePlan("nemo", None, None, f"no usable {precision} ONNX export: {reason}{hint}")


def fallback_plan(settings: Settings, reason: str) -> RuntimePlan:
    """The NeMo plan `auto` falls back to when the export was found but failed to load."""
    return RuntimePlan("nemo", None, None,
                       f"the {settings.edge_diarization_precision} ONNX export failed to load: {reason}")


__all__ = ["EXPORT_HINT", "RuntimePlan", "fallback_plan", "plan_runtime"]
