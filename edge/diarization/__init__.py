"""Local speaker diarization with NeMo's streaming Sortformer, run in a supervised worker.

The daemon itself never imports NeMo or torch: `nemo_diarization_available()` only finds the
module specs (cheap, safe on the start-up path); the worker process does the real import.

Daemon side (no torch, NeMo or onnxruntime):
- `engine.py`: admission, routing of session audio to the worker, step timeouts, status.
- `supervisor.py` / `process.py`: the worker's life (spawn, load, restart with backoff, memory).
- `wire.py`: the framed protocol the daemon and the worker speak.
- `session.py` / `feed.py`: one session's diarizer stream and its audio units on the session clock.
- `merge.py`: `SpeakerTimeline`, frames to speaker numbers for words.
- `model.py`: resolve (path -> cache -> Hugging Face), verify, unpack once (`ModelUnavailable`).
- `files.py`: the live engine over an audio file (`edge diarize`), RTTM and probability output.

Worker side: `worker/` (its own process; the only package that imports those libraries).
"""

from __future__ import annotations

import importlib.util

NEMO_MODULES = ("torch", "nemo", "nemo.collections.asr")


def nemo_diarization_available(deep: bool = False) -> tuple[bool, str | None]:
    """Whether NeMo diarization can run here: `(True, None)` or `(False, reason)`.

    `deep=False` looks for the packages without importing them (start-up, /ready).
    `deep=True` imports NeMo's Sortformer model class — seconds, and ~700 MB — for
    `scripts/check_nemo.py` and the worker.
    """
    for name in NEMO_MODULES:
        try:
            if importlib.util.find_spec(name) is None:
                return False, f"No module named '{name}'"
        except (ImportError, ValueError) as exc:
            return False, f"{type(exc).__name__}: {exc}"
    if deep:
        try:
            from nemo.collections.asr.models import SortformerEncLabelModel  # noqa: F401
        except Exception as exc:  # NeMo raises many kinds on broken installs
            return False, f"{type(exc).__name__}: {exc}"
    return True, None


__all__ = ["nemo_diarization_available"]
