"""Diarize an audio file with the live engine, and write what comes out (RTTM, probabilities).

`edge diarize FILE` uses this: the file is fed in pieces exactly as a live session would be,
so its output is what a session would have produced for the same audio.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge.clock import ACTIVE_THRESHOLD, FRAME_S, SAMPLE_RATE, SLOTS
from edge.settings import Settings


@dataclass
class FileResult:
    """Frame probabilities (frames x `SLOTS`, 80 ms frames) and how they were made (`runtime` onnx |
    nemo, `precision` fp32 | int8 on onnx, None on nemo)."""

    probs: np.ndarray
    params: dict[str, int]
    device: str
    model: Path
    audio_s: float
    compute_s: float
    runtime: str = "nemo"
    precision: str | None = None


def read_audio(path: Path) -> np.ndarray:
    """Read any file soundfile can, as float32 mono 16 kHz in [-1, 1].

    Channels are averaged; other rates are resampled with soxr. Raises `ValueError` with one
    line when the file cannot be read.
    """
    import soundfile
    import soxr

    try:
        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (OSError, RuntimeError, soundfile.LibsndfileError) as exc:
        raise ValueError(f"{path}: cannot read audio: {exc}") from exc
    mono = data.mean(axis=1)
    if rate != SAMPLE_RATE:
        mono = soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def diarize_file(
    audio: np.ndarray,
    settings: Settings,
    piece_ms: int = 500,
    model_path: Path | None = None,
    progress: Callable[[float, float], None] | None = None,
    runtime: str | None = None,
    precision: str | None = None,
) -> FileResult:
    """Resolve and load the model, then run the live engine over `audio` in `piece_ms` pieces.

    `runtime` (onnx | nemo | auto) and `precision` (fp32 | int8) override
    `EDGE_DIARIZATION_RUNTIME` / `EDGE_DIARIZATION_PRECISION`; the runtime is chosen and loaded
    as the worker does (`worker.loading.load_diarizer`). `progress(done_s, total_s)` is called
    after each piece. Returns a `FileResult`. Raises `ModelUnavailable` when the model (or the
    asked runtime) cannot be had, `ValueError` for a bad piece size.
    """
    import time

    from edge.diarization.model import resolve_model
    from edge.diarization.worker.loading import load_diarizer

    if piece_ms <= 0:
        raise ValueError(f"--piece-ms must be > 0, got {piece_ms}")
    update: dict[str, Any] = {"nemo_diar_model_path": model_path, "edge_diarization_runtime": runtime,
                              "edge_diarization_precision": precision}
    settings = settings.model_copy(update={k: v for k, v in update.items() if v is not None})
    path = resolve_model(settings)
    params = settings.diarization_streaming_params()
    diarizer, device, plan = load_diarizer(settings, path, params)
    session = diarizer.new_session()
    piece = max(1, SAMPLE_RATE * piece_ms // 1000)
    total_s = audio.size / SAMPLE_RATE
    out = []
    start = time.perf_counter()
    for i in range(0, audio.size, piece):
        out.append(session.feed(audio[i : i + piece]))
        if progress is not None:
            progress(min(audio.size, i + piece) / SAMPLE_RATE, total_s)
    out.append(session.finish())
    compute_s = time.perf_counter() - start
    diarizer.close()
    probs = np.concatenate(out) if out else np.zeros((0, SLOTS), dtype=np.float32)
    return FileResult(probs, params, device, path, total_s, compute_s, plan.runtime, plan.precision)


def rttm_lines(probs: np.ndarray, file_id: str, threshold: float = ACTIVE_THRESHOLD) -> list[str]:
    """RTTM `SPEAKER` lines: one per run of frames where a slot is active (probability at or
    above `threshold`), in order of start. Speakers are named `speaker_<slot>`; times in
    seconds on the 80 ms frame grid (2 decimals are exact)."""
    segments = []
    for spk in range(probs.shape[1]):
        active = np.concatenate(([False], probs[:, spk] >= threshold, [False]))
        edges = np.flatnonzero(active[1:] != active[:-1])
        segments += [(a * FRAME_S, b * FRAME_S, spk)
                     for a, b in zip(edges[::2], edges[1::2], strict=True)]
    return segment_lines(sorted(segments, key=lambda s: s[0]), file_id, decimals=2)


def segment_lines(segments: Iterable[tuple[float, float, int]], file_id: str,
                  decimals: int = 3) -> list[str]:
    """RTTM `SPEAKER` lines for (start s, end s, speaker) segments, in the order given, with
    `decimals` places; speaker n is named `speaker_<n>`."""
    return [f"SPEAKER {file_id} 1 {s:.{decimals}f} {e - s:.{decimals}f} <NA> <NA> speaker_{spk} "
            "<NA> <NA>" for s, e, spk in segments]


def write_rttm(probs: np.ndarray, path: Path, file_id: str) -> None:
    """Write `rttm_lines` to `path`."""
    text = "\n".join(rttm_lines(probs, file_id))
    path.write_text(text + "\n" if text else "")


def write_probs(result: FileResult, path: Path) -> Path:
    """Write `result.probs` (frames x 4, float32) to `path` (.npy) and the streaming parameters,
    under NeMo's `sortformer_modules` names, to the `.json` beside it. Returns the JSON path."""
    np.save(path, result.probs.astype(np.float32))
    meta: dict[str, Any] = {
        "sortformer_modules": result.params,
        "frame_s": FRAME_S,
        "frames": int(result.probs.shape[0]),
        "model": str(result.model),
        "device": result.device,
        "runtime": result.runtime,
        "precision": result.precision,
    }
    json_path = path.with_suffix(".json")
    json_path.write_text(json.dumps(meta, indent=2) + "\n")
    return json_path


__all__ = ["FileResult", "diarize_file", "read_audio", "rttm_lines", "segment_lines", "write_probs",
           "write_rttm"]
