"""Shared by the diarization tests: settings for a temp cache, a loaded tiny model, test audio."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edge.diarization.exports import (
    FEATURES_FILE,
    INPUTS,
    ONNX_FILES,
    OPSET,
    OUTPUTS,
    file_entry,
    write_marker,
)
from edge.diarization.model import file_sha256
from edge.settings import Settings

SR = 16000


def settings(cache: Path, **overrides: Any) -> Settings:
    """Settings with a private cache and no download, whatever the developer's environment says."""
    values: dict[str, Any] = {"nemo_cache_dir": cache, "edge_model_download": False,
                              "hf_hub_offline": False, "nemo_diar_model_path": None,
                              "edge_model_sha256": None}
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def speechlike(seconds: float, seed: int = 0) -> np.ndarray:
    """Two alternating 'voices' (different pitch and formant-ish timbre), pauses and noise."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    t = np.arange(n) / SR
    out = 0.01 * rng.standard_normal(n)
    turn = 0
    start = 0
    while start < n:
        length = int(rng.uniform(0.8, 3.0) * SR)
        seg = slice(start, min(n, start + length))
        f0 = (120.0, 210.0)[turn % 2] * (1 + 0.05 * np.sin(2 * np.pi * 3 * t[seg]))
        phase = 2 * np.pi * np.cumsum(f0) / SR
        voice = sum(np.sin(k * phase) / k for k in range(1, 8 + 4 * (turn % 2)))
        envelope = (np.sin(2 * np.pi * 4 * t[seg]) > -0.3).astype(float)  # syllable-ish bursts
        out[seg] += 0.2 * voice * envelope
        start += length + int(rng.uniform(0.0, 0.6) * SR)
        turn += 1
    return np.clip(out, -1, 1).astype(np.float32)


def hand_made_export(folder: Path, source: Path, precisions: tuple[str, ...] = ("fp32",),
                     **marker_overrides: Any) -> dict[str, Any]:
    """A folder laid out as the builder lays it out, with placeholder file contents."""
    folder.mkdir(parents=True)
    names = [ONNX_FILES[p] for p in precisions] + [FEATURES_FILE]
    for i, name in enumerate(names):
        (folder / name).write_bytes(bytes([i + 1]) * (1000 + i))
    marker = {
        "source_sha256": file_sha256(source), "source_name": source.name,
        "versions": {"nemo": "x", "torch": "x", "onnx": "x", "onnxruntime": "x"},
        "opset": OPSET, "inputs": list(INPUTS), "outputs": list(OUTPUTS),
        "features": {"n_mels": 128}, "streaming": {"fc_d_model": 512},
        "files": {n: file_entry(folder / n) for n in names}, "created": "2026-11-30T00:00:00+00:00",
    }
    marker.update(marker_overrides)
    write_marker(folder, marker)
    return marker


def offline(model: Any, audio: np.ndarray, params: dict[str, int]) -> np.ndarray:
    """NeMo's own path: features of the whole file, then `forward_streaming`."""
    import torch

    from edge.diarization.worker.streaming import apply_streaming_params

    apply_streaming_params(model, params)
    with torch.inference_mode():
        preds = model.forward(audio_signal=torch.from_numpy(audio)[None],
                              audio_signal_length=torch.tensor([audio.size]))
    return preds[0].numpy()


def sizes(seconds: float) -> Iterator[int]:
    """Audio piece sizes (samples) for feeding a stream: always `seconds` worth."""
    while True:
        yield int(seconds * SR)


def random_sizes(seed: int = 1) -> Iterator[int]:
    """Piece sizes that hit the edge cases: empty, one sample, around one hop, large."""
    rng = np.random.default_rng(seed)
    while True:
        yield int(rng.choice([0, 1, 7, 159, 160, 161, 1000, 4000, 23456, 77777]))


def default_params() -> dict[str, int]:
    """The streaming parameters the default settings give."""
    return settings(Path("/nonexistent")).diarization_streaming_params()


def load_tiny_model(cache: Path) -> Any:
    """The tiny random-weight Sortformer, loaded through the worker's own path."""
    from edge.diarization.model import resolve_model
    from edge.diarization.worker.loading import load_model
    from tests.fakes.sortformer import tiny_model_path

    s = settings(cache, nemo_diar_model_path=tiny_model_path())
    return load_model(resolve_model(s), s)


def run(diarizer: Any, audio: np.ndarray, pieces: Iterator[int]) -> tuple[np.ndarray, Any]:
    """Feed `audio` to a new session of `diarizer` in `pieces`, then finish it; returns all
    frames and the session, checking the frame count and shape on every piece."""
    session = diarizer.new_session()
    out, i = [], 0
    for n in pieces:
        if i >= audio.size:
            break
        frames = session.feed(audio[i : i + n])
        assert frames.dtype == np.float32 and frames.shape[1] == 4
        out.append(frames)
        i += n
        assert session.frames_emitted == sum(len(o) for o in out)
    out.append(session.finish())
    return np.concatenate(out), session
