"""Load the diarizer: the runtime `edge.diarization.runtime.plan_runtime` chooses, with its
fallback (`load_diarizer`); the Sortformer checkpoint with NeMo's own classes (`load_model`,
imports torch and NeMo) or its ONNX export (imports onnxruntime only).

`load_model` loads from the extracted-once copy that `edge.diarization.model.extract_model`
keeps in the cache, with torch's weights-only unpickler stated explicitly.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge.diarization.model import ModelUnavailable, extract_model, first_line, trim_memory
from edge.diarization.runtime import RuntimePlan, fallback_plan, plan_runtime
from edge.settings import Settings

log = logging.getLogger("edge.diarization.worker")


class Phases:
    """Where a load's time goes: `mark(name)` records the wall-clock seconds (`seconds`) and
    this process's CPU seconds, all threads (`cpu_seconds`), since the previous mark under
    `name`, in order. `cpu_seconds["boot"]` is the CPU spent before the `Phases` was made (the
    interpreter's start and imports). CPU time says what a phase costs even on a busy machine,
    where the wall clock mostly measures the wait for a core."""

    def __init__(self) -> None:
        self._last, self._last_cpu = time.perf_counter(), time.process_time()
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {"boot": round(self._last_cpu, 3)}

    def mark(self, name: str) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        self.seconds[name] = round(self.seconds.get(name, 0.0) + now - self._last, 3)
        self.cpu_seconds[name] = round(self.cpu_seconds.get(name, 0.0) + cpu - self._last_cpu, 3)
        self._last, self._last_cpu = now, cpu


def load_diarizer(settings: Settings, path: Path, params: dict[str, int],
                  mark: Callable[[str], None] = lambda name: None) -> tuple[Any, str, RuntimePlan]:
    """The diarizer for the checkpoint at `path` on the planned runtime: `(diarizer, device,
    plan)`, the diarizer offering `new_session()` / `close()` (`OnnxDiarizer` or
    `StreamingDiarizer`). `mark` is called with "plan" once the runtime is chosen (the export
    verified) and "open" once the model is loaded (`Phases.mark`).

    With `EDGE_DIARIZATION_RUNTIME=auto`, an export that fails to load (e.g. an int8 graph
    onnxruntime refuses) logs one line and NeMo is used. Raises `ModelUnavailable` (one line)
    when the planned runtime cannot be had (`onnx` without a usable export, NeMo missing).
    """
    plan = plan_runtime(settings, path)
    mark("plan")
    if plan.note:
        log.info("diarizer runtime: %s", plan.describe())
    if plan.runtime == "onnx":
        try:
            from edge.diarization.worker.onnx_streaming import OnnxDiarizer

            assert plan.export is not None
            onnx = OnnxDiarizer(plan.export, params, settings.stt_nemo_diarization_max_speakers,
                                threads=settings.edge_diarization_threads,
                                device=settings.edge_diarization_device, cache_dir=settings.nemo_cache_dir)
            mark("open")
            return onnx, onnx.device, plan
        except Exception as exc:
            reason = " ".join(str(exc).split())[:300] or type(exc).__name__
            if settings.edge_diarization_runtime == "onnx":
                raise ModelUnavailable(f"EDGE_DIARIZATION_RUNTIME=onnx but {reason}") from exc
            plan = fallback_plan(settings, reason)
            log.warning("diarizer runtime: %s", plan.describe())
    try:
        from edge.diarization.worker.streaming import StreamingDiarizer
    except Exception as exc:
        raise ModelUnavailable(f"NeMo not available: {type(exc).__name__}: {first_line(exc)}") from exc
    device = select_device(settings)
    model = load_model(path, settings, device)
    diarizer = StreamingDiarizer(model, params, settings.stt_nemo_diarization_max_speakers)
    mark("open")
    return diarizer, device, plan


def nemo_importable() -> tuple[bool, str | None]:
    """Import NeMo's Sortformer model class for real (seconds, ~700 MB): `(True, None)` or
    `(False, reason)`. For `scripts/check_nemo.py`; the daemon only looks for module specs."""
    from edge.diarization import nemo_diarization_available

    ok, err = nemo_diarization_available()
    if not ok:
        return ok, err
    try:
        from nemo.collections.asr.models import SortformerEncLabelModel  # noqa: F401
    except Exception as exc:  # NeMo raises many kinds on broken installs
        return False, f"{type(exc).__name__}: {exc}"
    return True, None


def select_device(settings: Settings) -> str:
    """`cuda` when `EDGE_DIARIZATION_DEVICE` allows it and CUDA works, else `cpu`.

    Imports torch. Raises `ModelUnavailable` when `cuda` is demanded but not available.
    """
    import torch

    wanted = settings.edge_diarization_device
    if wanted == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if wanted == "cuda":
        raise ModelUnavailable("EDGE_DIARIZATION_DEVICE=cuda but CUDA is not available")
    return "cpu"


def load_model(path: Path, settings: Settings, device: str = "cpu") -> Any:
    """Load the checkpoint at `path` with NeMo's own classes; returns a `SortformerEncLabelModel`
    in eval mode on `device`.

    Loads from an extracted-once, verified copy in the cache (unpacking only when the source
    changed), sets torch's thread count (`EDGE_DIARIZATION_THREADS` > 0) and trims the heap
    after loading. Raises `ModelUnavailable(reason)`.
    """
    if os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "").lower() not in ("", "0", "false"):
        # That variable lets torch.load run a pickle's code; a .nemo must never get that.
        raise ModelUnavailable("refusing to load: TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ModelUnavailable(f"unknown device {device!r} (cpu | cuda)")
    folder = extract_model(path, settings)
    try:
        import torch
        from nemo.collections.asr.models import SortformerEncLabelModel
    except Exception as exc:  # a broken NeMo install raises many kinds
        raise ModelUnavailable(f"NeMo is not usable: {type(exc).__name__}: {first_line(exc)}") from exc
    if settings.edge_diarization_threads > 0:
        torch.set_num_threads(settings.edge_diarization_threads)
    connector = _connector()
    connector.model_extracted_dir = str(folder)
    try:
        model = SortformerEncLabelModel.restore_from(
            restore_path=str(path), map_location=torch.device(device), strict=True,
            save_restore_connector=connector,
        )
    except Exception as exc:
        raise ModelUnavailable(f"{path}: cannot load: {type(exc).__name__}: {first_line(exc)}") from exc
    if not isinstance(model, SortformerEncLabelModel) or not getattr(model, "streaming_mode", False):
        raise ModelUnavailable(f"{path}: not a streaming Sortformer model")
    model.eval()
    trim_memory()
    return model


def _connector() -> Any:
    """NeMo's `SaveRestoreConnector`, reading the weights with `weights_only=True` stated
    explicitly (so no environment variable can re-enable the pickle loader) and `mmap=True`
    (tensors are paged in from the unpacked file instead of a second in-memory copy, which
    lowers the load-time peak)."""
    import torch
    from nemo.core.connectors.save_restore_connector import SaveRestoreConnector

    class Connector(SaveRestoreConnector):
        @staticmethod
        def _load_state_dict_from_disk(model_weights: str, map_location: Any = "cpu") -> Any:
            return torch.load(model_weights, map_location=map_location, weights_only=True, mmap=True)

    return Connector()
