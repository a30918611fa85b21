"""NeMo's synchronous speaker-cache/FIFO update with AOSC compression, in numpy (no torch).

A line-by-line port of `SortformerModules.streaming_update` and the functions it calls
(`_get_silence_profile`, `_compress_spkcache`, `_get_log_pred_scores`, `_disable_low_scores`,
`_boost_topk_scores`, `_get_topk_indices`, `_gather_spkcache_and_preds`) from nemo_toolkit 3.0.0
(`nemo/collections/asr/modules/sortformer_modules.py`), in eval mode (no speaker permutation, no
random score noise), batch size 1. Ports that simplified this step (dropping the oldest frames,
max instead of log-odds scores) lost accuracy; keep it literal. The ONNX runtime runs it on the
host after each step of the exported network; tests compare it with NeMo's torch code.

Arrays carry NeMo's batch axis (size 1) so every shape reads as in the original.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, fields
from typing import Any

import numpy as np


@dataclass(frozen=True)
class CacheParams:
    """The `sortformer_modules` attributes the update reads (NeMo's names and meanings); the
    defaults are those of `SortformerModules.__init__`, which a checkpoint may override."""

    n_spk: int
    spkcache_len: int
    fifo_len: int
    spkcache_update_period: int
    spkcache_sil_frames_per_spk: int = 3
    pred_score_threshold: float = 0.25
    max_index: int = 99999
    scores_boost_latest: float = 0.05
    sil_threshold: float = 0.2
    strong_boost_rate: float = 0.75
    weak_boost_rate: float = 1.5
    min_pos_scores_rate: float = 0.5

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> CacheParams:
        """Build from a mapping (an export marker's `streaming` section) holding at least every
        field without a default; fields it lacks keep NeMo's defaults, extra keys are ignored.

        Raises `KeyError` naming a missing required field and `ValueError` naming a field whose
        value is not an integer (int fields) or a finite number (float fields).
        """
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in values:
                if f.default is MISSING:
                    raise KeyError(f.name)
                continue
            value = values[f.name]
            integer = f.type == "int"
            number = isinstance(value, (int, float)) and math.isfinite(value)
            ok = isinstance(value, int) if integer else number
            if isinstance(value, bool) or not ok:
                raise ValueError(f"speaker-cache parameter {f.name} must be "
                                 f"{'an integer' if integer else 'a finite number'}, got {value!r}")
            kwargs[f.name] = int(value) if integer else float(value)
        return cls(**kwargs)

    @classmethod
    def from_module(cls, modules: Any) -> CacheParams:
        """Read them from a NeMo `SortformerModules` (or anything with those attributes)."""
        return cls(**{f.name: getattr(modules, f.name) for f in fields(cls)})


# The AOSC constants: what a checkpoint's `sortformer_modules` config may set beyond the
# streaming parameters; the export marker records them (`streaming` section).
AOSC_NAMES = tuple(f.name for f in fields(CacheParams) if f.default is not MISSING)


@dataclass
class CacheState:
    """One session's `StreamingSortformerState` (sync mode), batch 1, float32."""

    spkcache: np.ndarray  # (1, S, D)
    fifo: np.ndarray  # (1, F, D)
    mean_sil_emb: np.ndarray  # (1, D)
    n_sil_frames: np.ndarray  # (1,) int64
    spkcache_preds: np.ndarray | None = None  # (1, S, n_spk) once the cache was first compressed
    fifo_preds: np.ndarray | None = None  # (1, F, n_spk)

    @classmethod
    def empty(cls, emb_dim: int) -> CacheState:
        """As `init_streaming_state(batch_size=1, async_streaming=False)` makes it."""
        return cls(
            spkcache=np.zeros((1, 0, emb_dim), np.float32),
            fifo=np.zeros((1, 0, emb_dim), np.float32),
            mean_sil_emb=np.zeros((1, emb_dim), np.float32),
            n_sil_frames=np.zeros((1,), np.int64),
        )

    def nbytes(self) -> int:
        """Bytes held by the state's arrays."""
        arrays = (self.spkcache, self.fifo, self.mean_sil_emb, self.n_sil_frames,
                  self.spkcache_preds, self.fifo_preds)
        return sum(a.nbytes for a in arrays if a is not None)


def streaming_update(
    p: CacheParams, state: CacheState, chunk: np.ndarray, preds: np.ndarray, lc: int = 0, rc: int = 0
) -> np.ndarray:
    """Move the chunk into the FIFO, FIFO overflow into the speaker cache, compress the cache.

    `chunk` (1, lc+chunk_len+rc, D) pre-encoded embeddings, `preds` (1, S+F+lc+chunk_len+rc,
    n_spk) the step's masked probabilities over cache + FIFO + chunk. Updates `state` in place
    and returns the chunk's predictions (1, chunk_len, n_spk).
    """
    spkcache_len = state.spkcache.shape[1]
    fifo_len = state.fifo.shape[1]
    chunk_len = chunk.shape[1] - lc - rc

    state.fifo_preds = preds[:, spkcache_len : spkcache_len + fifo_len]
    chunk = chunk[:, lc : chunk_len + lc]
    chunk_preds = preds[:, spkcache_len + fifo_len + lc : spkcache_len + fifo_len + chunk_len + lc]

    state.fifo = np.concatenate([state.fifo, chunk], axis=1)
    state.fifo_preds = np.concatenate([state.fifo_preds, chunk_preds], axis=1)

    if fifo_len + chunk_len > p.fifo_len:
        pop_out_len = p.spkcache_update_period
        pop_out_len = max(pop_out_len, chunk_len - p.fifo_len + fifo_len)
        pop_out_len = min(pop_out_len, fifo_len + chunk_len)

        pop_out_embs = state.fifo[:, :pop_out_len]
        pop_out_preds = state.fifo_preds[:, :pop_out_len]
        state.mean_sil_emb, state.n_sil_frames = _get_silence_profile(
            p, state.mean_sil_emb, state.n_sil_frames, pop_out_embs, pop_out_preds
        )
        state.fifo = state.fifo[:, pop_out_len:]
        state.fifo_preds = state.fifo_preds[:, pop_out_len:]

        state.spkcache = np.concatenate([state.spkcache, pop_out_embs], axis=1)
        if state.spkcache_preds is not None:  # the cache has been compressed at least once
            state.spkcache_preds = np.concatenate([state.spkcache_preds, pop_out_preds], axis=1)
        if state.spkcache.shape[1] > p.spkcache_len:
            if state.spkcache_preds is None:  # first compression
                state.spkcache_preds = np.concatenate([preds[:, :spkcache_len], pop_out_preds], axis=1)
            state.spkcache, state.spkcache_preds = _compress_spkcache(
                p, state.spkcache, state.spkcache_preds, state.mean_sil_emb
            )
    return chunk_preds


def _get_silence_profile(
    p: CacheParams, mean_sil_emb: np.ndarray, n_sil_frames: np.ndarray, emb_seq: np.ndarray,
    preds: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    is_sil = preds.sum(axis=2) < np.float32(p.sil_threshold)
    sil_count = is_sil.sum(axis=1)
    if not (sil_count > 0).any():
        return mean_sil_emb, n_sil_frames
    sil_emb_sum = np.sum(emb_seq * is_sil[..., None], axis=1, dtype=np.float32)
    upd_n_sil_frames = n_sil_frames + sil_count
    old_sil_emb_sum = mean_sil_emb * n_sil_frames[:, None].astype(np.float32)
    total_sil_sum = old_sil_emb_sum + sil_emb_sum
    upd_mean = total_sil_sum / np.maximum(upd_n_sil_frames[:, None], 1).astype(np.float32)
    return upd_mean.astype(np.float32), upd_n_sil_frames.astype(np.int64)


def _get_log_pred_scores(p: CacheParams, preds: np.ndarray) -> np.ndarray:
    thr = np.float32(p.pred_score_threshold)
    log_probs = np.log(np.maximum(preds, thr))
    log_1_probs = np.log(np.maximum(np.float32(1.0) - preds, thr))
    log_1_probs_sum = np.broadcast_to(log_1_probs.sum(axis=2, keepdims=True), preds.shape)
    # torch adds the Python float log(0.5) in float32; so does numpy with a float32 scalar.
    return (log_probs - log_1_probs + log_1_probs_sum - np.float32(math.log(0.5))).astype(np.float32)


def _disable_low_scores(preds: np.ndarray, scores: np.ndarray, min_pos_scores_per_spk: int) -> np.ndarray:
    is_speech = preds > 0.5
    scores = np.where(is_speech, scores, np.float32(-np.inf))
    is_pos = scores > 0
    is_nonpos_replace = (~is_pos) & is_speech & (is_pos.sum(axis=1)[:, None, :] >= min_pos_scores_per_spk)
    return np.where(is_nonpos_replace, np.float32(-np.inf), scores).astype(np.float32)


def _topk_unsorted(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the `k` largest entries along axis 1 of a 2-D or 3-D array, the same set that
    `torch.topk(values, k, dim=1, sorted=False)` picks on the CPU.

    Which of several equal values at the cut torch keeps is decided by its algorithm, and such
    ties are common here (a frame kept for two overlapping speakers sits twice in the cache; a
    saturated sigmoid gives equal scores). Where a tie straddles the cut, torch's selection is
    replayed (`_torch_topk_set`); elsewhere the set is unique and numpy finds it. Ties among
    -inf do not matter to the callers (such frames are never boosted nor kept).
    """
    order = np.argsort(-values, axis=1, kind="stable")[:, :k]
    if k == 0:
        return order
    moved = np.moveaxis(values, 1, -1)  # (..., n): one row per column of axis 1
    picks = np.moveaxis(order, 1, -1).copy()
    rows = moved.reshape(-1, moved.shape[-1])
    flat_picks = picks.reshape(-1, k)
    for r, row in enumerate(rows):
        cut = row[flat_picks[r, -1]]
        if cut != -np.inf and np.count_nonzero(row >= cut) > k:
            flat_picks[r] = _torch_topk_set(row, k)
    return np.moveaxis(flat_picks.reshape(picks.shape), -1, 1)


def _torch_topk_set(row: np.ndarray, k: int) -> np.ndarray:
    """The indices torch's CPU `topk(largest=True)` returns for a 1-D `row` (ATen TopKImpl.h):
    a size-k heap that admits only strictly larger values when `k * 64 <= n`, else libstdc++'s
    `std::nth_element` (introselect) over (value, index) pairs compared by value."""
    n = row.size
    if k * 64 <= n:
        # The heap keeps the first k and replaces its minimum only by a strictly larger value:
        # among equal values the lower indices stay, which is a stable descending sort.
        return np.argsort(-row, kind="stable")[:k]
    q = [(float(v), i) for i, v in enumerate(row)]
    _nth_element(q, k - 1)
    return np.array([i for _, i in q[:k]], dtype=np.int64)


def _nth_element(q: list[tuple[float, int]], nth: int) -> None:
    """libstdc++'s `std::nth_element(q.begin(), q.begin() + nth, q.end(), greater-by-value)`."""
    first, last = 0, len(q)
    if nth >= last:
        return
    depth = 2 * (last.bit_length() - 1)  # 2 * std::__lg(n)
    while last - first > 3:
        if depth == 0:
            _heap_select(q, first, nth + 1, last)
            q[first], q[nth] = q[nth], q[first]
            return
        depth -= 1
        cut = _partition_pivot(q, first, last)
        if cut <= nth:
            first = cut
        else:
            last = cut
    _insertion_sort(q, first, last)


def _partition_pivot(q: list[tuple[float, int]], first: int, last: int) -> int:
    mid = first + (last - first) // 2
    a, b, c = first + 1, mid, last - 1
    # std::__move_median_to_first(first, a, b, c)
    if q[a][0] > q[b][0]:
        if q[b][0] > q[c][0]:
            m = b
        elif q[a][0] > q[c][0]:
            m = c
        else:
            m = a
    elif q[a][0] > q[c][0]:
        m = a
    elif q[b][0] > q[c][0]:
        m = c
    else:
        m = b
    q[first], q[m] = q[m], q[first]
    # std::__unguarded_partition(first + 1, last, pivot = first)
    pivot = q[first][0]
    lo, hi = first + 1, last
    while True:
        while q[lo][0] > pivot:
            lo += 1
        hi -= 1
        while pivot > q[hi][0]:
            hi -= 1
        if not lo < hi:
            return lo
        q[lo], q[hi] = q[hi], q[lo]
        lo += 1


def _insertion_sort(q: list[tuple[float, int]], first: int, last: int) -> None:
    if first == last:
        return
    for i in range(first + 1, last):
        val = q[i]
        if val[0] > q[first][0]:
            q[first + 1 : i + 1] = q[first:i]
            q[first] = val
        else:  # std::__unguarded_linear_insert
            j = i
            while val[0] > q[j - 1][0]:
                q[j] = q[j - 1]
                j -= 1
            q[j] = val


def _heap_select(q: list[tuple[float, int]], first: int, middle: int, last: int) -> None:
    length = middle - first
    if length >= 2:  # std::__make_heap
        parent = (length - 2) // 2
        while True:
            _adjust_heap(q, first, parent, length, q[first + parent])
            if parent == 0:
                break
            parent -= 1
    for i in range(middle, last):
        if q[i][0] > q[first][0]:  # std::__pop_heap(first, middle, i)
            val = q[i]
            q[i] = q[first]
            _adjust_heap(q, first, 0, length, val)


def _adjust_heap(q: list[tuple[float, int]], first: int, hole: int, length: int,
                 val: tuple[float, int]) -> None:
    top = hole
    child = hole
    while child < (length - 1) // 2:
        child = 2 * (child + 1)
        if q[first + child][0] > q[first + child - 1][0]:
            child -= 1
        q[first + hole] = q[first + child]
        hole = child
    if length % 2 == 0 and child == (length - 2) // 2:
        child = 2 * (child + 1)
        q[first + hole] = q[first + child - 1]
        hole = child - 1
    parent = (hole - 1) // 2  # std::__push_heap
    while hole > top and q[first + parent][0] > val[0]:
        q[first + hole] = q[first + parent]
        hole = parent
        parent = (hole - 1) // 2
    q[first + hole] = val


def _boost_topk_scores(
    scores: np.ndarray, n_boost_per_spk: int, scale_factor: float = 1.0, offset: float = 0.5
) -> np.ndarray:
    topk_indices = _topk_unsorted(scores, n_boost_per_spk)  # (1, k, n_spk)
    n_spk = scores.shape[2]
    batch = np.arange(scores.shape[0])[:, None, None]
    spk = np.arange(n_spk)[None, None, :]
    scores[batch, topk_indices, spk] -= np.float32(scale_factor * math.log(offset))
    return scores


def _get_topk_indices(p: CacheParams, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    batch_size, n_frames, _ = scores.shape
    n_frames_no_sil = n_frames - p.spkcache_sil_frames_per_spk
    scores_flatten = scores.transpose(0, 2, 1).reshape(batch_size, -1)
    topk_indices = _topk_unsorted(scores_flatten, p.spkcache_len)
    topk_values = np.take_along_axis(scores_flatten, topk_indices, axis=1)
    valid = topk_values != -np.inf
    topk_indices = np.where(valid, topk_indices, p.max_index)
    topk_sorted = np.sort(topk_indices, axis=1)
    is_disabled = topk_sorted == p.max_index
    topk_sorted = np.remainder(topk_sorted, n_frames)
    is_disabled |= topk_sorted >= n_frames_no_sil
    topk_sorted[is_disabled] = 0
    return topk_sorted, is_disabled


def _gather_spkcache_and_preds(
    emb_seq: np.ndarray, preds: np.ndarray, topk_indices: np.ndarray, is_disabled: np.ndarray,
    mean_sil_emb: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    emb = np.take_along_axis(emb_seq, topk_indices[..., None], axis=1)
    emb = np.where(is_disabled[..., None], mean_sil_emb[:, None, :], emb)
    pr = np.take_along_axis(preds, topk_indices[..., None], axis=1)
    pr = np.where(is_disabled[..., None], np.float32(0.0), pr)
    return emb.astype(np.float32), pr.astype(np.float32)


def _compress_spkcache(
    p: CacheParams, emb_seq: np.ndarray, preds: np.ndarray, mean_sil_emb: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    batch_size, _, n_spk = preds.shape
    spkcache_len_per_spk = p.spkcache_len // n_spk - p.spkcache_sil_frames_per_spk
    strong_boost_per_spk = math.floor(spkcache_len_per_spk * p.strong_boost_rate)
    weak_boost_per_spk = math.floor(spkcache_len_per_spk * p.weak_boost_rate)
    min_pos_scores_per_spk = math.floor(spkcache_len_per_spk * p.min_pos_scores_rate)

    scores = _get_log_pred_scores(p, preds)
    scores = _disable_low_scores(preds, scores, min_pos_scores_per_spk)
    if p.scores_boost_latest > 0:  # boost newly added frames
        scores[:, p.spkcache_len :, :] += np.float32(p.scores_boost_latest)
    scores = _boost_topk_scores(scores, strong_boost_per_spk, scale_factor=2)
    scores = _boost_topk_scores(scores, weak_boost_per_spk, scale_factor=1)
    if p.spkcache_sil_frames_per_spk > 0:  # silence frames at the end of each speaker's block
        pad = np.full((batch_size, p.spkcache_sil_frames_per_spk, n_spk), np.inf, np.float32)
        scores = np.concatenate([scores, pad], axis=1)
    topk_indices, is_disabled = _get_topk_indices(p, scores)
    return _gather_spkcache_and_preds(emb_seq, preds, topk_indices, is_disabled, mean_sil_emb)


__all__ = ["AOSC_NAMES", "CacheParams", "CacheState", "streaming_update"]
