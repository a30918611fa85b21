"""Log-mel features computed incrementally, bit-for-bit as NeMo computes them on a whole file.

Featurizing each arriving piece on its own is wrong: pre-emphasis and the centred STFT reach
across piece boundaries (errors up to 9 in features, 0.27 in speaker probabilities). This class
keeps exactly the state the offline path implies:

- pre-emphasis `y[n] = x[n] - a·x[n-1]` carried across pieces (the very first sample as is);
- the centred STFT is `n_fft/2` zeros prepended once, then `stft(center=False)` over a sliding
  buffer, so frame `f` covers buffer samples `[hop·f, hop·f + n_fft)` and is final once
  `hop·f + n_fft/2` input samples exist;
- at the end, zeros are appended (as `center=True` pads) and frames up to `floor(N/hop)` are
  emitted — NeMo's `seq_len`, the extra STFT frame is trimmed by the model too.

The window, filterbank and constants are taken from the model's own featurizer, so a checkpoint
with other settings is followed, and one whose features cannot be computed live (per-utterance
normalisation) is refused.
"""

from __future__ import annotations

import torch

# BLAS picks other kernels for very narrow matrices, which changes the last bit of the mel
# projection; at >= 16 columns it matches the offline (whole-file) product exactly.
MIN_MEL_COLUMNS = 16


class FeatureConfigError(ValueError):
    """The model's feature front end cannot be computed incrementally; `str()` says why."""


class IncrementalFeatures:
    """Turns audio pieces into final log-mel frames, identical to NeMo's preprocessor.

    Accepts the model's `FilterbankFeatures` (`model.preprocessor.featurizer`) and a device.
    Raises `FeatureConfigError` if that front end cannot be reproduced live.
    """

    def __init__(self, featurizer: torch.nn.Module, device: torch.device | str = "cpu") -> None:
        _check_supported(featurizer)
        self.device = torch.device(device)
        self.n_fft: int = featurizer.n_fft
        self.hop: int = featurizer.hop_length
        self.win_length: int = featurizer.win_length
        self.preemph: float | None = featurizer.preemph
        self.mag_power: float = featurizer.mag_power
        self.guard = featurizer.log_zero_guard_value_fn(torch.zeros(1))
        self.window = featurizer.window.to(dtype=torch.float, device=self.device)
        self.fb = featurizer.fb.to(self.device)
        self.n_mels: int = self.fb.shape[1]
        self.pad = self.n_fft // 2
        # Pre-emphasised samples of the padded signal, starting at padded index `_buf_start`.
        self._buf = torch.zeros(self.pad, dtype=torch.float, device=self.device)
        self._buf_start = 0
        self._last: torch.Tensor | None = None  # the previous raw sample, for pre-emphasis
        self.n_samples = 0  # raw samples received
        self.n_frames = 0  # frames emitted so far
        self.finished = False

    def push(self, samples: torch.Tensor) -> torch.Tensor:
        """Add raw samples (1-D float32, 16 kHz); returns the newly final frames, (n_mels, n)."""
        if self.finished:
            raise RuntimeError("push() after finish()")
        if samples.numel():
            x = samples.to(device=self.device, dtype=torch.float)
            if self.preemph is not None:
                # Same element-wise ops as NeMo's `x[1:] - a * x[:-1]`, so the same bits.
                joined = x if self._last is None else torch.cat((self._last, x))
                y = joined[1:] - self.preemph * joined[:-1]
                if self._last is None:
                    y = torch.cat((x[:1], y))
                self._last = x[-1:].clone()
            else:
                y = x
            self._buf = torch.cat((self._buf, y))
            self.n_samples += x.numel()
        # Frame f is final once hop*f + n_fft/2 raw samples exist.
        ready = max(0, (self.n_samples - self.pad) // self.hop + 1)
        return self._frames_until(ready)

    def finish(self) -> torch.Tensor:
        """End of audio: pads with zeros like the centred STFT, returns the remaining frames."""
        if self.finished:
            return self._empty()
        self.finished = True
        self._buf = torch.cat((self._buf, self._buf.new_zeros(self.pad)))
        return self._frames_until(self.n_samples // self.hop)

    def state_bytes(self) -> int:
        """Bytes held by the sample buffer (the window, filterbank are shared constants)."""
        return self._buf.numel() * self._buf.element_size()

    def _empty(self) -> torch.Tensor:
        return torch.zeros((self.n_mels, 0), dtype=torch.float, device=self.device)

    def _frames_until(self, end: int) -> torch.Tensor:
        start = self.n_frames
        if end <= start:
            return self._empty()
        a = start * self.hop - self._buf_start
        b = (end - 1) * self.hop + self.n_fft - self._buf_start
        spec = torch.stft(
            self._buf[a:b], n_fft=self.n_fft, hop_length=self.hop, win_length=self.win_length,
            center=False, window=self.window, return_complex=True,
        )
        mag = torch.sqrt(torch.view_as_real(spec).pow(2).sum(-1))
        if self.mag_power != 1.0:
            mag = mag.pow(self.mag_power)
        n = mag.shape[-1]
        if n < MIN_MEL_COLUMNS:
            mag = torch.cat((mag, mag.new_zeros(mag.shape[0], MIN_MEL_COLUMNS - n)), dim=1)
        mel = torch.matmul(self.fb.to(mag.dtype), mag.unsqueeze(0))[0, :, :n]
        feats = torch.log(mel + self.guard)
        self.n_frames = end
        # Keep only what the next frame needs: it starts at padded index hop*end.
        keep_from = end * self.hop - self._buf_start
        self._buf = self._buf[keep_from:].clone()
        self._buf_start = end * self.hop
        return feats


def _check_supported(f: torch.nn.Module) -> None:
    """Raise `FeatureConfigError` unless `f` is a front end we reproduce exactly."""
    checks = {
        "normalize": f.normalize in (None, "", "NA", "none", False),
        "centred STFT (exact_pad=False)": getattr(f, "stft_pad_amount", None) is None,
        "frame_splicing=1": getattr(f, "frame_splicing", 1) == 1,
        "log features": bool(getattr(f, "log", True)),
        "log_zero_guard_type=add": getattr(f, "log_zero_guard_type", "add") == "add",
    }
    bad = [name for name, ok in checks.items() if not ok]
    if bad:
        raise FeatureConfigError(
            "model front end cannot be computed live: needs " + ", ".join(bad)
            + f" (normalize={f.normalize!r})"
        )


__all__ = ["FeatureConfigError", "IncrementalFeatures"]
