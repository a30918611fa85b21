"""Log-mel features computed incrementally in numpy (no torch), for the ONNX runtime.

The same computation as `features.IncrementalFeatures` (which uses torch for the NeMo runtime,
see its docstring for why featurizing pieces on their own is wrong), with the same carried
state: pre-emphasis across pieces, `n_fft/2` zeros prepended once (the centred STFT), a sliding
sample buffer, frame f final once `hop·f + n_fft/2` samples exist, zeros appended at the end and
frames up to `floor(N/hop)` emitted. The window and mel filterbank are the checkpoint's own
buffers, as the export stores them (`features.npz`), so another checkpoint's front end is
followed. Computed in float32 like torch; the FFTs differ in rounding, so values agree with
NeMo's to ~5e-5 (in near-silent bins at log ~ -16), not bit for bit
(tests/test_diarization_numpy_features.py measures it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class FeatureConfig:
    """What the front end needs: STFT sizes, pre-emphasis, magnitude power, log guard, and the
    checkpoint's window (`win_length` samples) and mel filterbank (n_mels, n_fft // 2 + 1)."""

    n_fft: int
    hop: int
    win_length: int
    preemph: float | None
    mag_power: float
    guard: float
    window: np.ndarray
    fb: np.ndarray

    @property
    def n_mels(self) -> int:
        return int(self.fb.shape[0])

    @classmethod
    def from_export(cls, features: dict[str, Any], npz: Path) -> FeatureConfig:
        """From an export's marker `features` dict and its `features.npz` (`window`, `fb`).

        Raises `ValueError` naming what is missing or inconsistent.
        """
        try:
            with np.load(npz) as arrays:
                window, fb = np.array(arrays["window"]), np.array(arrays["fb"])
            cfg = cls(
                n_fft=int(features["n_fft"]), hop=int(features["hop_length"]),
                win_length=int(features["win_length"]),
                preemph=None if features.get("preemph") is None else float(features["preemph"]),
                mag_power=float(features["mag_power"]), guard=float(features["log_zero_guard"]),
                window=window.astype(np.float64).reshape(-1),
                fb=fb.astype(np.float64).reshape(-1, int(features["n_fft"]) // 2 + 1),
            )
        except (KeyError, OSError, ValueError, TypeError) as exc:
            raise ValueError(f"export feature config unusable: {type(exc).__name__}: {exc}") from exc
        if cfg.window.size != cfg.win_length or cfg.win_length > cfg.n_fft:
            raise ValueError(f"export window has {cfg.window.size} samples, win_length is "
                             f"{cfg.win_length}, n_fft {cfg.n_fft}")
        if "n_mels" in features and int(features["n_mels"]) != cfg.n_mels:
            raise ValueError(f"export filterbank has {cfg.n_mels} mels, the marker says {features['n_mels']}")
        return cfg


class NumpyFeatures:
    """Turns audio pieces into final log-mel frames (time-major), as NeMo's preprocessor does
    on the whole file. Accepts a `FeatureConfig`. Not thread-safe."""

    def __init__(self, cfg: FeatureConfig) -> None:
        self.cfg = cfg
        self.n_mels = cfg.n_mels
        self.pad = cfg.n_fft // 2
        # torch.stft centres a shorter window inside n_fft.
        left = (cfg.n_fft - cfg.win_length) // 2
        window = np.zeros(cfg.n_fft)
        window[left : left + cfg.win_length] = cfg.window
        self._window = window.astype(np.float32)
        self._fb = np.ascontiguousarray(cfg.fb, dtype=np.float32)  # (n_mels, n_fft // 2 + 1)
        self._buf = np.zeros(self.pad, dtype=np.float32)  # pre-emphasised padded signal
        self._buf_start = 0  # padded-signal index of _buf[0]
        self._last: np.float32 | None = None  # previous raw sample, for pre-emphasis
        self.n_samples = 0
        self.n_frames = 0
        self.finished = False

    def push(self, samples: np.ndarray) -> np.ndarray:
        """Add raw samples (1-D float32, 16 kHz); returns the newly final frames, (n, n_mels)."""
        if self.finished:
            raise RuntimeError("push() after finish()")
        x = np.asarray(samples, dtype=np.float32)
        if x.size:
            a = self.cfg.preemph
            if a is not None:
                # float32 like NeMo's `x[1:] - a * x[:-1]`, the first sample of all kept as is.
                prev = x[:1] if self._last is None else np.array([self._last], np.float32)
                joined = np.concatenate((prev, x))
                y = joined[1:] - np.float32(a) * joined[:-1]
                if self._last is None:
                    y[0] = x[0]
                self._last = x[-1]
            else:
                y = x
            self._buf = np.concatenate((self._buf, y))
            self.n_samples += x.size
        ready = max(0, (self.n_samples - self.pad) // self.cfg.hop + 1)
        return self._frames_until(ready)

    def finish(self) -> np.ndarray:
        """End of audio: pads with zeros like the centred STFT, returns the remaining frames."""
        if self.finished:
            return np.zeros((0, self.n_mels), np.float32)
        self.finished = True
        self._buf = np.concatenate((self._buf, np.zeros(self.pad, np.float32)))
        return self._frames_until(self.n_samples // self.cfg.hop)

    def state_bytes(self) -> int:
        """Bytes held by the sample buffer."""
        return int(self._buf.nbytes)

    def _frames_until(self, end: int) -> np.ndarray:
        start = self.n_frames
        if end <= start:
            return np.zeros((0, self.n_mels), np.float32)
        cfg = self.cfg
        a = start * cfg.hop - self._buf_start
        n = end - start
        span = self._buf[a : a + (n - 1) * cfg.hop + cfg.n_fft]
        frames = np.lib.stride_tricks.sliding_window_view(span, cfg.n_fft)[:: cfg.hop] * self._window
        mag = np.abs(np.fft.rfft(frames, n=cfg.n_fft, axis=1))
        if cfg.mag_power == 2.0:
            np.square(mag, out=mag)
        elif cfg.mag_power != 1.0:
            mag = mag**cfg.mag_power
        # einsum, not `@`: numpy's BLAS would run this small product on several threads whose
        # busy-waiting afterwards takes the cores from ONNX Runtime's step (measured 100x
        # slower than one thread on the shared 2-core machine).
        mel = np.einsum("nf,mf->nm", mag, self._fb)
        feats = np.log(mel + np.float32(cfg.guard)).astype(np.float32, copy=False)
        self.n_frames = end
        keep_from = end * cfg.hop - self._buf_start
        self._buf = self._buf[keep_from:].copy()
        self._buf_start = end * cfg.hop
        return feats


__all__ = ["FeatureConfig", "NumpyFeatures"]
