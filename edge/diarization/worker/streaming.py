"""True live diarization: one NeMo streaming Sortformer state per session, fed in pieces.

Audio of any piece size goes through exact incremental features (`features.py`); each time a
whole chunk (plus its right context) of features exists, NeMo's own `forward_streaming_step`
runs once on it with the session's speaker cache + FIFO. So every audio second is encoded once,
speaker slots keep their arrival order for the whole session, and the output equals NeMo's
`model.forward()` on the whole file with the same streaming parameters (chunks are cut exactly
as `SortformerModules.streaming_feat_loader` cuts them).

Speaker folding (`max_speakers` < 4): an extra slot k >= max_speakers is folded into the
*nearest* allowed slot, meaning the allowed slot whose voice is most similar: the cosine
similarity between the slots' mean final hidden state (the transformer output that the speaker
head reads) over the frames where each slot was active (p > 0.5). The choice is made the first
time slot k becomes active and then fixed for the session, so a number never changes person;
with no allowed slot active yet, k folds into the last allowed slot. Folding takes the max of the
probabilities; folded columns are zero.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from edge.diarization.worker.features import IncrementalFeatures

N_SPK = 4
ACTIVE = 0.5  # a slot is "active" in a frame above this probability
STREAMING_PARAM_NAMES = (
    "chunk_len", "chunk_left_context", "chunk_right_context", "fifo_len",
    "spkcache_len", "spkcache_update_period",
)


def apply_streaming_params(model: Any, params: dict[str, int]) -> None:
    """Set the streaming parameters (NeMo `sortformer_modules` attribute names) on `model`.

    Raises `ValueError` for an unknown name or a value NeMo rejects.
    """
    unknown = set(params) - set(STREAMING_PARAM_NAMES)
    if unknown:
        raise ValueError(f"unknown streaming parameters: {sorted(unknown)}")
    modules = model.sortformer_modules
    for name, value in params.items():
        setattr(modules, name, int(value))
    modules._check_streaming_parameters()


class StreamingDiarizer:
    """Owns the model and the streaming parameters; makes one `SessionStream` per session.

    Accepts a loaded `SortformerEncLabelModel`, the streaming parameters (as
    `Settings.diarization_streaming_params()` returns them) and the speaker limit (1..4).
    Raises `ValueError` for a model that is not a streaming Sortformer, bad parameters, or a
    feature front end that cannot run live (`FeatureConfigError`).
    """

    def __init__(self, model: Any, params: dict[str, int], max_speakers: int = N_SPK) -> None:
        if not getattr(model, "streaming_mode", False):
            raise ValueError("model is not a streaming Sortformer (streaming_mode is off)")
        if model.sortformer_modules.n_spk != N_SPK:
            raise ValueError(f"model has {model.sortformer_modules.n_spk} speaker slots, expected {N_SPK}")
        if not 1 <= max_speakers <= N_SPK:
            raise ValueError(f"max_speakers must be 1..{N_SPK}, got {max_speakers}")
        self.model = model.eval()
        # Batch-1 sessions use NeMo's synchronous update (stock async seeding is buggy, see notes).
        self.model.async_streaming = False
        apply_streaming_params(self.model, params)
        # Names not given keep the checkpoint's values; all of them are pinned for later steps.
        self.params = {k: int(getattr(model.sortformer_modules, k)) for k in STREAMING_PARAM_NAMES}
        self.max_speakers = max_speakers
        self.device = next(model.parameters()).device
        self.subsampling = int(model.encoder.subsampling_factor)
        IncrementalFeatures(model.preprocessor.featurizer, self.device)  # fail now, not per session
        self._hidden: torch.Tensor | None = None
        self._hook = None
        if max_speakers < N_SPK:
            # Folding compares voices by the transformer's output; NeMo's step does not return
            # it, so capture it on its way to the speaker head.
            self._hook = model.transformer_encoder.register_forward_hook(self._keep_hidden)

    def new_session(self) -> SessionStream:
        """A fresh session: empty speaker cache and FIFO, frame 0 at its first sample."""
        return SessionStream(self)

    def close(self) -> None:
        """Remove the hook this diarizer put on the model (if any)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _keep_hidden(self, module: Any, args: Any, output: torch.Tensor) -> None:
        self._hidden = output

    def _step(self, session: SessionStream, chunk: torch.Tensor, left: int, right: int) -> torch.Tensor:
        """One NeMo streaming step for `session`; returns (n, 4) chunk probabilities."""
        if any(getattr(self.model.sortformer_modules, k) != v for k, v in self.params.items()):
            apply_streaming_params(self.model, self.params)  # another diarizer shares the model
        state = session.state
        prefix = state.spkcache.shape[1] + state.fifo.shape[1]
        length = torch.tensor([chunk.shape[1]], dtype=torch.long, device=self.device)
        # An empty total_preds each step: NeMo concatenates onto it (quadratic if kept).
        empty = torch.zeros((1, 0, N_SPK), device=self.device)
        session.state, preds = self.model.forward_streaming_step(
            processed_signal=chunk, processed_signal_length=length, streaming_state=state,
            total_preds=empty, left_offset=left, right_offset=right,
        )
        preds = preds[0]
        if self._hook is not None and self._hidden is not None:
            lc = round(left / self.subsampling)
            session._observe(preds, self._hidden[0, prefix + lc : prefix + lc + preds.shape[0]])
            self._hidden = None
        return preds


class SessionStream:
    """One session's streaming state: incremental features, speaker cache + FIFO, folding.

    `frames_emitted` counts frames returned so far; frame k covers [k·0.08, (k+1)·0.08) s of
    the session's audio. Not thread-safe: one caller at a time (the worker's step loop).
    """

    def __init__(self, diarizer: StreamingDiarizer) -> None:
        self.d = diarizer
        model = diarizer.model
        self.features = IncrementalFeatures(model.preprocessor.featurizer, diarizer.device)
        self.state = model.sortformer_modules.init_streaming_state(
            batch_size=1, async_streaming=False, device=diarizer.device
        )
        p = diarizer.params
        sub = diarizer.subsampling
        self._chunk = p["chunk_len"] * sub  # in feature frames
        self._lc = p["chunk_left_context"] * sub
        self._rc = p["chunk_right_context"] * sub
        n_mels = self.features.n_mels
        self._feats = torch.zeros((1, n_mels, 0), device=diarizer.device)
        self._feat_base = 0  # feature-frame index of self._feats[..., 0]
        self._stt = 0  # feature frame where the next chunk starts
        self.frames_emitted = 0
        self.finished = False
        # Folding statistics: per slot, the activity mass and the activity-weighted hidden sum.
        self.fold_map: dict[int, int] = {}
        self._mass = torch.zeros(N_SPK, dtype=torch.float64)
        self._hsum: torch.Tensor | None = None

    def feed(self, samples: np.ndarray) -> np.ndarray:
        """Add audio: float32 mono 16 kHz in [-1, 1], any length (0 is fine).

        Returns the newly final frames, shape (n, 4) float32 speaker probabilities (n may be 0).
        Raises `ValueError` for non-1-D input, `RuntimeError` after `finish()`.
        """
        if self.finished:
            raise RuntimeError("feed() after finish()")
        arr = np.asarray(samples, dtype=np.float32)
        if arr.ndim != 1:
            raise ValueError(f"samples must be 1-D mono, got shape {arr.shape}")
        with torch.inference_mode():
            self._add_features(self.features.push(torch.from_numpy(arr)))
            return self._run(final=False)

    def finish(self) -> np.ndarray:
        """End of audio: pads like the offline path, returns the remaining frames (n, 4)."""
        if self.finished:
            return np.zeros((0, N_SPK), dtype=np.float32)
        with torch.inference_mode():
            self._add_features(self.features.finish())
            out = self._run(final=True)
        self.finished = True
        return out

    def fill_caches(self, seed: int = 0, overflow: bool = True) -> None:
        """Fill the speaker cache and the FIFO with random embeddings, as full as they are in
        a session that has spoken for `spkcache_len + fifo_len` frames (~25 s by default).

        A fresh session's first steps see empty caches and run several times cheaper than
        that; every later step runs the encoder over both caches and the chunk. With
        `overflow`, the FIFO is full, so the next step pushes frames into the speaker cache and
        compresses it (the costliest step); without, the FIFO has just room for one chunk (a
        plain step). For measuring (the worker's warm-up), never for a real session: the
        labels would be noise.
        """
        p, d_model = self.d.params, self.d.model.sortformer_modules.fc_d_model
        st = self.state
        g = torch.Generator().manual_seed(seed)

        def rand(*shape: int) -> torch.Tensor:
            return torch.rand(shape, generator=g).to(device=st.spkcache.device, dtype=st.spkcache.dtype)

        fifo = p["fifo_len"] if overflow else max(0, p["fifo_len"] - p["chunk_len"])
        st.spkcache = rand(1, p["spkcache_len"], d_model)
        st.spkcache_preds = rand(1, p["spkcache_len"], N_SPK)
        st.fifo, st.fifo_preds = rand(1, fifo, d_model), rand(1, fifo, N_SPK)

    def state_bytes(self) -> int:
        """Memory held by this session: speaker cache, FIFO, their predictions, buffers."""
        total = self.features.state_bytes() + _tensor_bytes(self._feats) + _tensor_bytes(self._mass)
        total += _tensor_bytes(self._hsum)
        for value in vars(self.state).values():
            total += _tensor_bytes(value)
        return total

    # --- internals ---

    def _add_features(self, new: torch.Tensor) -> None:
        if new.shape[1]:
            self._feats = torch.cat((self._feats, new.unsqueeze(0)), dim=2)

    def _run(self, final: bool) -> np.ndarray:
        """Run every chunk that is complete (all of them when `final`), as NeMo's loader cuts them."""
        outputs = []
        n_feat = self._feat_base + self._feats.shape[2]
        while True:
            if final:
                if self._stt >= n_feat:
                    break
            elif n_feat < self._stt + self._chunk + self._rc:
                break
            left = min(self._lc, self._stt)
            end = min(self._stt + self._chunk, n_feat)
            right = min(self._rc, n_feat - end)
            a, b = self._stt - left - self._feat_base, end + right - self._feat_base
            chunk = self._feats[:, :, a:b].transpose(1, 2)
            outputs.append(self.d._step(self, chunk, left, right))
            self._stt = end
            # The next chunk needs at most left-context frames before its start.
            drop = max(0, self._stt - self._lc - self._feat_base)
            if drop:
                self._feats = self._feats[:, :, drop:].clone()
                self._feat_base += drop
        if not outputs:
            return np.zeros((0, N_SPK), dtype=np.float32)
        probs = torch.cat(outputs).float().cpu().numpy()
        self.frames_emitted += probs.shape[0]
        return self._fold(probs)

    def _observe(self, preds: torch.Tensor, hidden: torch.Tensor) -> None:
        """Accumulate per-slot voice statistics and fix fold targets for newly active slots."""
        weights = (preds * (preds > ACTIVE)).double().cpu()  # (n, 4)
        h = hidden.double().cpu()  # (n, d)
        if self._hsum is None:
            self._hsum = torch.zeros((N_SPK, h.shape[1]), dtype=torch.float64)
        self._mass += weights.sum(0)
        self._hsum += weights.T @ h
        allowed = self.d.max_speakers
        for k in range(allowed, N_SPK):
            if k not in self.fold_map and self._mass[k] > 0:
                self.fold_map[k] = nearest_slot(self._hsum, self._mass, k, allowed)

    def _fold(self, probs: np.ndarray) -> np.ndarray:
        allowed = self.d.max_speakers
        if allowed == N_SPK:
            return probs
        out = probs.copy()
        for k, target in self.fold_map.items():
            np.maximum(out[:, target], probs[:, k], out=out[:, target])
        out[:, allowed:] = 0.0
        return out


def nearest_slot(hsum: torch.Tensor, mass: torch.Tensor, k: int, allowed: int) -> int:
    """The allowed slot (< `allowed`) whose mean hidden state is most cosine-similar to slot k's.

    `hsum` (4, d) activity-weighted sums, `mass` (4,) activity totals. Slots without activity
    are not candidates; with none, returns `allowed - 1` (the latest allowed arrival).
    """
    if mass[k] <= 0:
        return allowed - 1
    target = hsum[k] / mass[k]
    best, best_sim = allowed - 1, -math.inf
    for j in range(allowed):
        if mass[j] <= 0:
            continue
        sim = float(torch.nn.functional.cosine_similarity(hsum[j] / mass[j], target, dim=0))
        if sim > best_sim:
            best, best_sim = j, sim
    return best


def _tensor_bytes(value: object) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    return 0


__all__ = ["STREAMING_PARAM_NAMES", "SessionStream", "StreamingDiarizer", "apply_streaming_params",
           "nearest_slot"]
