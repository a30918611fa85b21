"""The diarizer worker: its own process, and the only code that imports torch, NeMo or onnxruntime.

The daemon spawns it (`python -m edge.diarization.worker`, see `edge.diarization.process`) and
speaks `edge.diarization.wire` with it. Nothing outside this package imports those libraries.

- `main.py`: the protocol loop (`Worker`): load, warm-up measurement, steps, stats.
- `loading.py`: `load_diarizer` (the runtime `edge.diarization.runtime` plans, with its
  fallback); load the checkpoint with NeMo's classes (device choice, weights-only).
- `stream_core.py`: what both runtimes share: chunk cutting, speaker folding, the session stream.
- `streaming.py`: NeMo runtime, `StreamingDiarizer` / `SessionStream` (torch, NeMo).
- `onnx_streaming.py`: ONNX runtime, `OnnxDiarizer` / `OnnxSessionStream` (onnxruntime, numpy).
- `speaker_cache.py`: NeMo's speaker-cache/FIFO update with AOSC compression, in numpy.
- `features.py`: log-mel features computed incrementally with torch (NeMo runtime).
- `numpy_features.py`: the same in numpy, from the export's window and filterbank (ONNX runtime).
- `export.py`: `edge model export`, the streaming step to ONNX (torch, NeMo).
- `quantize.py`: the int8 export: graph preparation and ONNX Runtime dynamic quantization.
- `faults.py`: test-only fault injection, imported only when `EDGE_DIARIZATION_FAULTS` is set.
"""
