"""True live diarization: one NeMo streaming Sortformer state per session, fed in pieces.

Audio of any piece size goes through exact incremental features (`features.py`); each time a
whole chunk (plus its right context) of features exists, NeMo's own `forward_streaming_step`
runs once on it with the session's speaker cache + FIFO. So every audio second is encoded once,
speaker slots keep their arrival order for the whole session, and the output equals NeMo's
`model.forward()` on the whole file with the same streaming parameters (chunks are cut exactly
as `SortformerModules.streaming_feat_loader` cuts them).

Chunk cutting and speaker folding are shared with the ONNX runtime (`stream_core.py`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from edge.clock import SLOTS
from edge.diarization.worker.features import IncrementalFeatures
from edge.diarization.worker.stream_core import (
    STREAMING_PARAM_NAMES,
    SessionStreamBase,
    check_max_speakers,
    nearest_slot,
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

    def __init__(self, model: Any, params: dict[str, int], max_speakers: int = SLOTS) -> None:
        if not getattr(model, "streaming_mode", False):
            raise ValueError("model is not a streaming Sortformer (streaming_mode is off)")
        if model.sortformer_modules.n_spk != SLOTS:
            raise ValueError(f"model has {model.sortformer_modules.n_spk} speaker slots, expected {SLOTS}")
        check_max_speakers(max_speakers)
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
        if max_speakers < SLOTS:
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

    def _step(self, session: SessionStream, chunk: np.ndarray, left: int,
              right: int) -> tuple[np.ndarray, np.ndarray | None]:
        """One NeMo streaming step for `session`: (n, 4) chunk probabilities and, with folding
        on, the chunk frames' hidden states."""
        if any(getattr(self.model.sortformer_modules, k) != v for k, v in self.params.items()):
            apply_streaming_params(self.model, self.params)  # another diarizer shares the model
        state = session.state
        prefix = state.spkcache.shape[1] + state.fifo.shape[1]
        signal = torch.from_numpy(chunk).to(self.device)[None]
        length = torch.tensor([chunk.shape[0]], dtype=torch.long, device=self.device)
        # An empty total_preds each step: NeMo concatenates onto it (quadratic if kept).
        empty = torch.zeros((1, 0, SLOTS), device=self.device)
        session.state, preds = self.model.forward_streaming_step(
            processed_signal=signal, processed_signal_length=length, streaming_state=state,
            total_preds=empty, left_offset=left, right_offset=right,
        )
        probs = preds[0].float().cpu().numpy()
        hidden = None
        if self._hook is not None and self._hidden is not None:
            lc = round(left / self.subsampling)
            hidden = self._hidden[0, prefix + lc : prefix + lc + len(probs)].double().cpu().numpy()
            self._hidden = None
        return probs, hidden


class SessionStream(SessionStreamBase):
    """One session's NeMo streaming state: torch incremental features, speaker cache + FIFO;
    chunking and folding from `SessionStreamBase`."""

    def __init__(self, diarizer: StreamingDiarizer) -> None:
        self.d = diarizer
        model = diarizer.model
        self.features = IncrementalFeatures(model.preprocessor.featurizer, diarizer.device)
        super().__init__(diarizer.params, diarizer.subsampling, self.features.n_mels,
                         diarizer.max_speakers)
        self.state = model.sortformer_modules.init_streaming_state(
            batch_size=1, async_streaming=False, device=diarizer.device
        )

    def _push_features(self, samples: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.features.push(torch.from_numpy(samples)).T.cpu().numpy()

    def _finish_features(self) -> np.ndarray:
        with torch.inference_mode():
            return self.features.finish().T.cpu().numpy()

    def _step(self, chunk: np.ndarray, left: int, right: int) -> tuple[np.ndarray, np.ndarray | None]:
        with torch.inference_mode():
            return self.d._step(self, chunk, left, right)

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
        st.spkcache_preds = rand(1, p["spkcache_len"], SLOTS)
        st.fifo, st.fifo_preds = rand(1, fifo, d_model), rand(1, fifo, SLOTS)

    def _state_bytes(self) -> int:
        total = self.features.state_bytes()
        for value in vars(self.state).values():
            total += _tensor_bytes(value)
        return total


def _tensor_bytes(value: object) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    return 0


__all__ = ["STREAMING_PARAM_NAMES", "SessionStream", "StreamingDiarizer", "apply_streaming_params",
           "nearest_slot"]
