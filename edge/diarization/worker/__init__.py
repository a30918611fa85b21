"""The diarizer worker: its own process, and the only code that imports torch, NeMo or onnxruntime.

The daemon spawns it (`python -m edge.diarization.worker`, see `edge.diarization.process`) and
speaks `edge.diarization.wire` with it. Nothing outside this package imports those libraries.

- `main.py`: the protocol loop (`Worker`): load, warm-up measurement, steps, stats.
- `loading.py`: load the checkpoint with NeMo's classes (device choice, weights-only).
- `streaming.py`: `StreamingDiarizer` / `SessionStream`, one NeMo streaming state per session.
- `features.py`: log-mel features computed incrementally, identical to NeMo's on the whole file.
- `faults.py`: test-only fault injection, imported only when `EDGE_DIARIZATION_FAULTS` is set.
"""
