"""What both runtimes' session streams share (numpy only): chunk cutting and speaker folding.

`SessionStreamBase` owns a session's feature-frame buffer, cuts it into chunks exactly as NeMo's
`SortformerModules.streaming_feat_loader` cuts a whole file (a chunk starting at feature frame
`chunk_start` — NeMo's `stt` — runs once `chunk_start + chunk + right context` feature frames
exist; left context `min(lc, chunk_start)`; at the end the rest, with what right context
exists), hands each chunk to its runtime's `_step`, and folds the result. The NeMo runtime
(`streaming.py`) and the ONNX runtime (`onnx_streaming.py`) differ only in how features are
computed and how a step runs, so their chunking and folding decisions are identical by
construction.

Speaker folding (`max_speakers` < 4): an extra slot k >= max_speakers is folded into the
*nearest* allowed slot, meaning the allowed slot whose voice is most similar: the cosine
similarity between the slots' mean final hidden state (the transformer output that the speaker
head reads) over the frames where each slot was active (p >= the clock's `ACTIVE_THRESHOLD`).
The choice is made the first time slot k becomes active and then fixed for the session, so a
number never changes person; with no allowed slot active yet, k folds into the last allowed
slot. Folding takes the max of the probabilities; folded columns are zero.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator

import numpy as np

from edge.clock import ACTIVE_THRESHOLD, SLOTS

STREAMING_PARAM_NAMES = (
    "chunk_len", "chunk_left_context", "chunk_right_context", "fifo_len",
    "spkcache_len", "spkcache_update_period",
)


class ChunkCutter:
    """A session's feature frames (time-major float32, (n, n_mels)) and where the next chunk
    starts. Accepts the streaming parameters (`STREAMING_PARAM_NAMES`), the encoder's
    subsampling factor and the number of mel bins."""

    def __init__(self, params: dict[str, int], subsampling: int, n_mels: int) -> None:
        self.chunk = params["chunk_len"] * subsampling  # in feature frames
        self.lc = params["chunk_left_context"] * subsampling
        self.rc = params["chunk_right_context"] * subsampling
        self.feats = np.zeros((0, n_mels), np.float32)
        self.base = 0  # feature-frame index of feats[0]
        self.chunk_start = 0  # feature-frame index where the next chunk starts (NeMo's `stt`)

    def add(self, frames: np.ndarray) -> None:
        """Append newly complete feature frames (n, n_mels)."""
        if len(frames):
            self.feats = np.concatenate((self.feats, np.asarray(frames, np.float32)))

    def chunks(self, flush: bool) -> Iterator[tuple[np.ndarray, int, int]]:
        """Yield `(frames (left + chunk + right, n_mels), left, right)` for every complete chunk
        (every remaining one when `flush`: the audio ended), advancing past each as it is yielded."""
        while True:
            n_feat = self.base + len(self.feats)
            if flush:
                if self.chunk_start >= n_feat:
                    return
            elif n_feat < self.chunk_start + self.chunk + self.rc:
                return
            left = min(self.lc, self.chunk_start)
            end = min(self.chunk_start + self.chunk, n_feat)
            right = min(self.rc, n_feat - end)
            a, b = self.chunk_start - left - self.base, end + right - self.base
            chunk = self.feats[a:b]
            self.chunk_start = end
            # The next chunk needs at most left-context frames before its start.
            drop = max(0, self.chunk_start - self.lc - self.base)
            if drop:
                self.feats = self.feats[drop:].copy()
                self.base += drop
            yield chunk, left, right

    def nbytes(self) -> int:
        return int(self.feats.nbytes)


class Folding:
    """Per-session folding of slots >= `max_speakers` (module docstring)."""

    def __init__(self, max_speakers: int) -> None:
        self.max_speakers = max_speakers
        self.fold_map: dict[int, int] = {}
        self._mass = np.zeros(SLOTS, np.float64)  # per slot: activity mass
        self._hsum: np.ndarray | None = None  # per slot: activity-weighted hidden-state sum

    @property
    def needs_hidden(self) -> bool:
        return self.max_speakers < SLOTS

    def observe(self, preds: np.ndarray, hidden: np.ndarray) -> None:
        """Accumulate one step's (n, 4) probabilities and (n, H) hidden states; fix the fold
        target of each extra slot the first time it is active."""
        weights = (preds * (preds >= ACTIVE_THRESHOLD)).astype(np.float64)
        h = np.asarray(hidden, np.float64)
        if self._hsum is None:
            self._hsum = np.zeros((SLOTS, h.shape[1]), np.float64)
        self._mass += weights.sum(0)
        self._hsum += weights.T @ h
        for k in range(self.max_speakers, SLOTS):
            if k not in self.fold_map and self._mass[k] > 0:
                self.fold_map[k] = nearest_slot(self._hsum, self._mass, k, self.max_speakers)

    def apply(self, probs: np.ndarray) -> np.ndarray:
        """Probabilities (n, 4) with the extra slots folded in and zeroed."""
        allowed = self.max_speakers
        if allowed == SLOTS:
            return probs
        out = probs.copy()
        for k, target in self.fold_map.items():
            np.maximum(out[:, target], probs[:, k], out=out[:, target])
        out[:, allowed:] = 0.0
        return out

    def nbytes(self) -> int:
        return int(self._mass.nbytes + (0 if self._hsum is None else self._hsum.nbytes))


def nearest_slot(hsum: np.ndarray, mass: np.ndarray, k: int, allowed: int) -> int:
    """The allowed slot (< `allowed`) whose mean hidden state is most cosine-similar to slot k's.

    `hsum` (4, d) activity-weighted sums, `mass` (4,) activity totals (arrays or CPU tensors).
    Slots without activity are not candidates; with none, returns `allowed - 1` (the latest
    allowed arrival).
    """
    hsum, mass = np.asarray(hsum, np.float64), np.asarray(mass, np.float64)
    if mass[k] <= 0:
        return allowed - 1
    target = hsum[k] / mass[k]
    best, best_sim = allowed - 1, -math.inf
    for j in range(allowed):
        if mass[j] <= 0:
            continue
        mean = hsum[j] / mass[j]
        # As torch's cosine_similarity: the product of norms clamped at eps = 1e-8.
        sim = float(mean @ target / max(float(np.linalg.norm(mean) * np.linalg.norm(target)), 1e-8))
        if sim > best_sim:
            best, best_sim = j, sim
    return best


def check_max_speakers(max_speakers: int) -> None:
    """Raise `ValueError` unless 1 <= max_speakers <= 4."""
    if not 1 <= max_speakers <= SLOTS:
        raise ValueError(f"max_speakers must be 1..{SLOTS}, got {max_speakers}")


class SessionStreamBase(ABC):
    """One session: features -> chunks -> runtime steps -> folded probabilities.

    `frames_emitted` counts frames returned so far; frame k covers [k, k + 1) · `FRAME_S`
    (edge/clock.py) of the stream's audio. Not thread-safe: one caller at a time (the worker's step loop).
    Subclasses implement `_push_features`, `_finish_features`, `_step` and `_state_bytes`.
    """

    def __init__(self, params: dict[str, int], subsampling: int, n_mels: int, max_speakers: int) -> None:
        self.cutter = ChunkCutter(params, subsampling, n_mels)
        self.folding = Folding(max_speakers)
        self.frames_emitted = 0
        self.finished = False

    @property
    def fold_map(self) -> dict[int, int]:
        """Extra slot -> the allowed slot it is folded into (fixed once chosen)."""
        return self.folding.fold_map

    def feed(self, samples: np.ndarray) -> np.ndarray:
        """Add audio: float32 mono 16 kHz in [-1, 1], any length (0 is fine).

        Returns the newly complete frames, shape (n, `SLOTS`) float32 slot probabilities (n may be 0).
        Raises `ValueError` for non-1-D input, `RuntimeError` after `finish()`.
        """
        if self.finished:
            raise RuntimeError("feed() after finish()")
        arr = np.asarray(samples, dtype=np.float32)
        if arr.ndim != 1:
            raise ValueError(f"samples must be 1-D mono, got shape {arr.shape}")
        self.cutter.add(self._push_features(arr))
        return self._run(flush=False)

    def finish(self) -> np.ndarray:
        """End of audio: pads like the offline path, returns the remaining frames (n, 4)."""
        if self.finished:
            return np.zeros((0, SLOTS), dtype=np.float32)
        self.cutter.add(self._finish_features())
        out = self._run(flush=True)
        self.finished = True
        return out

    def state_bytes(self) -> int:
        """Memory held by this session: runtime state, feature and sample buffers, folding."""
        return self._state_bytes() + self.cutter.nbytes() + self.folding.nbytes()

    def _run(self, flush: bool) -> np.ndarray:
        outputs = []
        for chunk, left, right in self.cutter.chunks(flush):
            preds, hidden = self._step(chunk, left, right)
            if hidden is not None and self.folding.needs_hidden:
                self.folding.observe(preds, hidden)
            outputs.append(preds)
        if not outputs:
            return np.zeros((0, SLOTS), dtype=np.float32)
        probs = np.concatenate(outputs).astype(np.float32, copy=False)
        self.frames_emitted += probs.shape[0]
        return self.folding.apply(probs)

    @abstractmethod
    def _push_features(self, samples: np.ndarray) -> np.ndarray:
        """Newly complete feature frames (n, n_mels) for these samples."""

    @abstractmethod
    def _finish_features(self) -> np.ndarray:
        """The remaining feature frames at the end of audio."""

    @abstractmethod
    def _step(self, chunk: np.ndarray, left: int, right: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Run one chunk (left + chunk + right frames, time-major); return its (n, 4) chunk
        probabilities and, when folding needs them, the chunk frames' (n, H) hidden states."""

    @abstractmethod
    def _state_bytes(self) -> int:
        """Bytes of the runtime's own state (speaker cache, FIFO, feature front end)."""


__all__ = ["STREAMING_PARAM_NAMES", "ChunkCutter", "Folding", "SessionStreamBase", "check_max_speakers",
           "nearest_slot"]
