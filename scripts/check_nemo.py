#!/usr/bin/env python3
"""Seed parity: is NeMo diarization usable in this Python environment?

Prints `nemo: OK  NeMo diarization available` and exits 0, or `nemo: FAIL  <reason>` and
exits 1. It imports NeMo for real (seconds), unlike the daemon's start-up check.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge.diarization.worker.loading import nemo_importable

if __name__ == "__main__":
    ok, err = nemo_importable()
    print("nemo: OK  NeMo diarization available" if ok else f"nemo: FAIL  {err}")
    sys.exit(0 if ok else 1)
