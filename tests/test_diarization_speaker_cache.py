"""The numpy port of NeMo's speaker-cache update (worker/speaker_cache.py) against NeMo's torch code.

Random states and predictions shaped like speech (one or two speakers active at a time, some
silence) drive many steps through both, with settings where the FIFO overflows and the cache is
compressed often; caches, FIFO, silence profile and chunk predictions must stay equal.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
sortformer_modules = pytest.importorskip("nemo.collections.asr.modules.sortformer_modules")

from edge.diarization.worker.speaker_cache import CacheParams, CacheState, streaming_update  # noqa: E402

D = 16


def _modules(**kw: Any) -> Any:
    m = sortformer_modules.SortformerModules(num_spks=4, fc_d_model=D, tf_d_model=8, **kw)
    return m.eval()


def _speechlike_preds(rng: np.random.Generator, n: int) -> np.ndarray:
    """(1, n, 4): runs of one speaker, sometimes two (overlap), sometimes none, plus noise."""
    out = np.zeros((n, 4), np.float32)
    i = 0
    while i < n:
        run = int(rng.integers(1, 12))
        active = rng.choice(4, size=int(rng.choice([0, 1, 1, 1, 2])), replace=False,
                            p=[0.4, 0.3, 0.2, 0.1])
        out[i : i + run] = rng.uniform(0.0, 0.3, (min(run, n - i), 4))
        for k in active:
            out[i : i + run, k] = rng.uniform(0.45, 1.0, min(run, n - i))
        i += run
    return out[None]


CASES = {
    "default-like": {"spkcache_len": 188, "fifo_len": 40, "chunk_len": 12, "spkcache_update_period": 30},
    "no-fifo": {"spkcache_len": 24, "fifo_len": 0, "chunk_len": 10, "spkcache_update_period": 10},
    "small": {"spkcache_len": 16, "fifo_len": 8, "chunk_len": 6, "spkcache_update_period": 9},
    "period<chunk": {"spkcache_len": 32, "fifo_len": 20, "chunk_len": 15, "spkcache_update_period": 5},
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("context", [(0, 0), (1, 2)])
def test_numpy_update_equals_nemo(case: str, context: tuple[int, int]) -> None:
    kw = CASES[case]
    mods = _modules(**kw)
    params = CacheParams.from_module(mods)
    assert params.spkcache_len == kw["spkcache_len"]
    ref = mods.init_streaming_state(batch_size=1, async_streaming=False, device="cpu")
    mine = CacheState.empty(D)
    rng = np.random.default_rng(sum(map(ord, case)) + context[0])
    lc, rc = context
    compressions = 0
    for step in range(60):
        chunk_len = kw["chunk_len"] if step % 7 else max(1, kw["chunk_len"] // 3)  # a short last chunk
        n_chunk = lc + chunk_len + rc
        prefix = ref.spkcache.shape[1] + ref.fifo.shape[1]
        chunk = rng.standard_normal((1, n_chunk, D)).astype(np.float32)
        preds = _speechlike_preds(rng, prefix + n_chunk)
        had = ref.spkcache_preds is not None and ref.spkcache.shape[1] >= kw["spkcache_len"]
        with torch.inference_mode():
            ref, ref_chunk = mods.streaming_update(ref, torch.from_numpy(chunk), torch.from_numpy(preds),
                                                   lc=lc, rc=rc)
        got_chunk = streaming_update(params, mine, chunk, preds, lc=lc, rc=rc)
        compressions += int(had or ref.spkcache_preds is not None)
        np.testing.assert_array_equal(got_chunk, ref_chunk.numpy())
        np.testing.assert_array_equal(mine.fifo, ref.fifo.numpy())
        np.testing.assert_array_equal(mine.fifo_preds, ref.fifo_preds.numpy())
        np.testing.assert_array_equal(mine.spkcache, ref.spkcache.numpy())
        assert (mine.spkcache_preds is None) == (ref.spkcache_preds is None)
        if ref.spkcache_preds is not None:
            np.testing.assert_array_equal(mine.spkcache_preds, ref.spkcache_preds.numpy())
        np.testing.assert_allclose(mine.mean_sil_emb, ref.mean_sil_emb.numpy(), rtol=0, atol=1e-6)
        np.testing.assert_array_equal(mine.n_sil_frames, ref.n_sil_frames.numpy())
    assert compressions > 10, "the cases must exercise the compression"


def test_params_from_values_needs_the_sizes() -> None:
    with pytest.raises(KeyError, match="fifo_len"):
        CacheParams.from_values({"n_spk": 4, "spkcache_len": 188})
    p = CacheParams.from_values({"n_spk": 4, "spkcache_len": 188, "fifo_len": 0,
                                 "spkcache_update_period": 188, "chunk_len": 9, "sil_threshold": 0.3})
    assert p.sil_threshold == 0.3 and p.pred_score_threshold == 0.25


def test_topk_picks_the_same_tied_entries_as_torch() -> None:
    """Equal scores at the cut are common (a frame kept for two speakers sits twice in the
    cache); the replayed selection must keep the same ones torch keeps, on both of its paths
    (heap for k*64 <= n, nth_element otherwise)."""
    from edge.diarization.worker.speaker_cache import _topk_unsorted

    rng = np.random.default_rng(0)
    for t in range(400):
        n = int(rng.integers(1, 1600))
        k = int(rng.integers(1, 40)) if t % 2 else int(rng.integers(1, n + 1))
        k = min(k, n)
        values = rng.integers(0, int(rng.integers(1, 30)), (1, n, 2)).astype(np.float32)
        if t % 3 == 0:
            values[rng.random(values.shape) < 0.3] = -np.inf
        ref = torch.topk(torch.from_numpy(values), k, dim=1, sorted=False).indices.numpy()
        got = _topk_unsorted(values, k)
        for c in range(2):
            chosen = values[0, got[0, :, c], c]
            finite_ref = {i for i in ref[0, :, c] if values[0, i, c] != -np.inf}
            finite_got = {i for i in got[0, :, c] if values[0, i, c] != -np.inf}
            assert finite_got == finite_ref, (t, n, k)
            assert len(chosen) == k
