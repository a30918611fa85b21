"""Live streaming == NeMo's own offline `model.forward()` on the whole file (tiny model)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.helpers.diarization import (
    SR,
    default_params,
    load_tiny_model,
    offline,
    random_sizes,
    run,
    settings,
    sizes,
    speechlike,
)

pytestmark = pytest.mark.nemo



@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return load_tiny_model(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def audio() -> np.ndarray:
    return speechlike(45.0)


def live(model: Any, audio: np.ndarray, params: dict[str, int], pieces: Iterator[int],
         max_speakers: int = 4) -> tuple[np.ndarray, Any]:
    from edge.diarization.worker.streaming import StreamingDiarizer

    diarizer = StreamingDiarizer(model, params, max_speakers=max_speakers)
    try:
        return run(diarizer, audio, pieces)
    finally:
        diarizer.close()


# Small cache/FIFO so that the speaker cache compresses many times within 45 s.
SMALL = {"chunk_len": 6, "chunk_left_context": 1, "chunk_right_context": 7, "fifo_len": 20,
         "spkcache_len": 40, "spkcache_update_period": 10}


@pytest.mark.parametrize("pieces", ["0.1s", "0.5s", "3s", "random"])
@pytest.mark.parametrize("which", ["default", "small"])
def test_live_equals_offline(model: Any, audio: np.ndarray, pieces: str, which: str) -> None:
    params = default_params() if which == "default" else SMALL
    feed = random_sizes() if pieces == "random" else sizes(float(pieces[:-1]))
    got, _ = live(model, audio, params, feed)
    want = offline(model, audio, params)
    assert got.shape == want.shape == (int(np.ceil(audio.size // 160 / 8)), 4)
    assert np.abs(got - want).max() <= 1e-4
    assert want.min() < 0.3 and want.max() > 0.7  # the model really discriminates frames


@pytest.mark.parametrize("preset", ["very-high", "high", "low", "ultra-low"])
def test_presets_equal_offline(model: Any, audio: np.ndarray, preset: str) -> None:
    params = settings(Path("/nonexistent"),
                      edge_diarization_preset=preset).diarization_streaming_params()
    clip = audio[: 25 * SR + 1234]  # a length that is not a whole number of frames
    got, _ = live(model, clip, params, sizes(0.5))
    assert np.abs(got - offline(model, clip, params)).max() <= 1e-4


def test_short_and_empty_audio_match_offline_and_finish_cleanly(model: Any) -> None:
    for n in (0, 100, 255, 256, 1279, 1280, 1281, 16000):
        clip = speechlike(1.0, seed=n)[:n]
        got, session = live(model, clip, SMALL, sizes(0.05))
        if n >= 160:
            want = offline(model, clip, SMALL)
            assert got.shape == want.shape
            assert np.abs(got - want).max() <= 1e-4
        else:
            assert got.shape == (0, 4)
        assert session.finish().shape == (0, 4)  # finishing twice is harmless
        with pytest.raises(RuntimeError):
            session.feed(clip)


def test_sessions_are_independent(model: Any, audio: np.ndarray) -> None:
    from edge.diarization.worker.streaming import StreamingDiarizer

    d = StreamingDiarizer(model, SMALL)
    a, b = d.new_session(), d.new_session()
    other = speechlike(20.0, seed=7)
    outs_a, outs_b = [], []
    for i in range(0, 20 * SR, 8000):  # interleaved, as the worker runs them
        outs_a.append(a.feed(audio[i : i + 8000]))
        outs_b.append(b.feed(other[i : i + 8000]))
    outs_a.append(a.finish())
    outs_b.append(b.finish())
    assert np.abs(np.concatenate(outs_a) - offline(model, audio[: 20 * SR], SMALL)).max() <= 1e-4
    assert np.abs(np.concatenate(outs_b) - offline(model, other, SMALL)).max() <= 1e-4
    assert 10_000 < a.state_bytes() < 5_000_000


def test_slots_past_max_speakers_fold_into_the_nearest_allowed_slot(model: Any, audio: np.ndarray) -> None:
    full, _ = live(model, audio, SMALL, sizes(0.5))
    folded, session = live(model, audio, SMALL, sizes(0.5), max_speakers=2)
    assert set(session.fold_map) == {2, 3} and set(session.fold_map.values()) <= {0, 1}
    want = full.copy()
    for k, target in session.fold_map.items():
        want[:, target] = np.maximum(want[:, target], full[:, k])
    want[:, 2:] = 0
    assert np.array_equal(folded, want)


def test_nearest_slot_is_the_closest_voice_or_the_last_allowed_when_silent() -> None:
    import torch

    from edge.diarization.worker.streaming import nearest_slot

    voices = torch.eye(4, dtype=torch.float64)
    voices[3] = torch.tensor([0.1, 0.9, 0.0, 0.0], dtype=torch.float64)  # slot 3 sounds like slot 1
    mass = torch.tensor([2.0, 3.0, 1.0, 4.0], dtype=torch.float64)
    hsum = voices * mass[:, None]
    assert nearest_slot(hsum, mass, k=3, allowed=2) == 1
    assert nearest_slot(hsum, mass, k=2, allowed=2) in (0, 1)
    silent = mass.clone()
    silent[:2] = 0
    assert nearest_slot(hsum, silent, k=3, allowed=2) == 1  # nothing to compare: last allowed slot
    assert nearest_slot(hsum, mass, k=3, allowed=1) == 0


def test_bad_speaker_counts_chunk_sizes_and_audio_shapes_are_refused(model: Any) -> None:
    from edge.diarization.worker.streaming import StreamingDiarizer

    with pytest.raises(ValueError):
        StreamingDiarizer(model, SMALL, max_speakers=5)
    with pytest.raises(ValueError):
        StreamingDiarizer(model, {**SMALL, "chunk_size": 3})
    session = StreamingDiarizer(model, SMALL).new_session()
    with pytest.raises(ValueError):
        session.feed(np.zeros((10, 2), dtype=np.float32))


def test_params_not_given_keep_the_checkpoint_values(model: Any, audio: np.ndarray) -> None:
    from edge.diarization.worker.streaming import STREAMING_PARAM_NAMES, StreamingDiarizer

    StreamingDiarizer(model, SMALL)
    d = StreamingDiarizer(model, {"chunk_len": 12})
    assert set(d.params) == set(STREAMING_PARAM_NAMES)
    assert d.params == {**SMALL, "chunk_len": 12}
    got, _ = live(model, audio[: 10 * SR], d.params, sizes(0.5))
    StreamingDiarizer(model, default_params())  # another diarizer changes the shared model...
    session = d.new_session()  # ...and this one's steps put its own parameters back
    out = np.concatenate([session.feed(audio[: 10 * SR]), session.finish()])
    assert np.abs(out - got).max() <= 1e-4


def test_fill_caches_gives_the_costliest_step(model: Any, audio: np.ndarray) -> None:
    """The worker's warm-up measures steps on full caches (what admission must budget for)."""
    from edge.diarization.worker.streaming import StreamingDiarizer

    d = StreamingDiarizer(model, SMALL)
    p = d.params
    steady = d.new_session()
    steady.feed(audio[: 20 * SR])  # 20 s = 250 frames: both caches long since full
    filled = d.new_session()
    filled.fill_caches()
    lengths: list[int] = []
    hook = model.transformer_encoder.register_forward_hook(
        lambda _m, _a, out: lengths.append(out.shape[1]))
    try:
        out = filled.feed(audio[: 2 * SR])
    finally:
        hook.remove()
    assert out.ndim == 2 and out.shape[1] == 4 and len(out) > 0
    # the first step already ran over the full speaker cache, the full FIFO and the chunk ...
    assert lengths[0] >= p["spkcache_len"] + p["fifo_len"] + p["chunk_len"]
    # ... and its FIFO overflowed into the cache, which was compressed back to its length
    assert filled.state.spkcache.shape[1] == p["spkcache_len"]
    assert steady.state.spkcache.shape[1] == p["spkcache_len"]
    # a plain step: full cache, the FIFO takes the chunk without overflowing
    plain = d.new_session()
    plain.fill_caches(overflow=False)
    assert len(plain.feed(audio[: int(1.2 * SR)])) == p["chunk_len"]  # exactly one step
    assert plain.state.fifo.shape[1] == p["fifo_len"]
    fresh = d.new_session()
    fresh.feed(audio[: 2 * SR])
    filled.fill_caches()  # the warm-up's per-session figure: never less than a long session's
    assert fresh.state_bytes() < steady.state_bytes() <= filled.state_bytes()
