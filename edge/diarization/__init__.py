"""Local speaker diarization with NeMo's streaming Sortformer, run in a supervised worker.

The daemon itself never imports NeMo or torch: `nemo_diarization_available()` only finds the
module specs (cheap, safe on the start-up path); the worker process does the real import.

- `model.py`: resolve (path -> cache -> Hugging Face), verify, unpack once, load (`ModelUnavailable`).
- `features.py`: log-mel features computed incrementally, identical to NeMo's on the whole file.
- `streaming.py`: `StreamingDiarizer` / `SessionStream`, one NeMo streaming state per session.
- `files.py`: the live engine over an audio file (`edge diarize`), RTTM and probability output.
This file, `files.py` and `model.py` (until `load_model` runs) import without torch.
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
