"""Local speaker diarization with NeMo's streaming Sortformer, run in a supervised worker.

The daemon itself never imports NeMo, torch or onnxruntime: `nemo_diarization_available()` and
`worker_runtime_available()` only find the module specs (cheap, safe on the start-up path); the
worker process does the real import.

Daemon side (no torch, NeMo or onnxruntime):
- `engine.py`: admission, routing of session audio to the worker, step timeouts, status.
- `supervisor.py`: keeps one worker running (spawn, load, watch, restart with backoff, memory).
- `process.py`: the worker process as the event loop sees it (spawn, framed send/receive, kill).
- `wire.py`: the framed protocol the daemon and the worker speak.
- `session.py`: `DiarizerSession`, what one client session holds of the local diarizer.
- `feed.py`: one session's audio on its way to the worker, and its frames onto the session clock.
- `timeline.py`: `SpeakerTimeline`, frames to speakers for words and turns.
- `model.py`: resolve the checkpoint (path -> cache -> Hugging Face) and verify its pin, with
  `cache.py` (the cache directory, `ModelUnavailable`, crash-safe writes), `download.py` (the
  resumable download) and `unpack.py` (unpack once, check the copy on later starts).
- `digests.py`: file SHA-256s, verified once per daemon life and handed from worker to worker.
- `exports.py` / `runtime.py`: find and verify an ONNX export; decide the worker's runtime.
- `files.py`: the live engine over an audio file (`edge diarize`), RTTM and probability output.
- `score.py` / `plot.py`: `edge eval`'s DER/JER from RTTM files (pyannote.metrics), and its plot.

Worker side: `worker/` (its own process; the only package that imports those libraries).
"""

from __future__ import annotations

import importlib.util

NEMO_MODULES = ("torch", "nemo", "nemo.collections.asr")


def nemo_diarization_available() -> tuple[bool, str | None]:
    """Whether NeMo diarization can run here, by module specs only (cheap, start-up, /ready):
    `(True, None)` or `(False, reason)`. `edge.diarization.worker.loading.nemo_importable()`
    imports it for real (seconds, ~700 MB; `scripts/check_nemo.py`)."""
    for name in NEMO_MODULES:
        try:
            if importlib.util.find_spec(name) is None:
                return False, f"No module named '{name}'"
        except (ImportError, ValueError) as exc:
            return False, f"{type(exc).__name__}: {exc}"
    return True, None


def worker_runtime_available(runtime: str) -> tuple[bool, str | None]:
    """Whether a worker runtime for `EDGE_DIARIZATION_RUNTIME` (`auto` | `onnx` | `nemo`) is
    installed, by module specs only: `(True, None)` or `(False, reason)`. `auto` needs either
    (the worker then picks by whether an export exists)."""
    nemo_ok, nemo_err = nemo_diarization_available()
    try:
        onnx_ok = importlib.util.find_spec("onnxruntime") is not None
    except (ImportError, ValueError):
        onnx_ok = False
    onnx_err = None if onnx_ok else "No module named 'onnxruntime'"
    if runtime == "nemo":
        return nemo_ok, None if nemo_ok else f"NeMo not available: {nemo_err}"
    if runtime == "onnx":
        return onnx_ok, None if onnx_ok else f"ONNX Runtime not available: {onnx_err}"
    if nemo_ok or onnx_ok:
        return True, None
    return False, f"neither NeMo ({nemo_err}) nor ONNX Runtime ({onnx_err}) is installed"


__all__ = ["nemo_diarization_available", "worker_runtime_available"]
