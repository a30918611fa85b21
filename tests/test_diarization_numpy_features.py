"""numpy log-mel features (worker/numpy_features.py) against NeMo's preprocessor on a whole file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge.diarization.worker.numpy_features import FeatureConfig, NumpyFeatures
from tests.helpers.diarization import SR, settings, speechlike

pytestmark = pytest.mark.nemo


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from edge.diarization.model import resolve_model
    from edge.diarization.worker.loading import load_model
    from tests.fakes.sortformer import tiny_model_path

    s = settings(tmp_path_factory.mktemp("cache"), nemo_diar_model_path=tiny_model_path())
    return load_model(resolve_model(s), s)


def config_from_npz(model: Any, folder: Path) -> FeatureConfig:
    """The config as the export stores it: the featurizer's own buffers through features.npz."""
    f = model.preprocessor.featurizer
    npz = folder / "features.npz"
    np.savez(npz, window=f.window.numpy().astype(np.float32),
             fb=f.fb.numpy().astype(np.float32).reshape(f.fb.shape[1], -1))
    guard = float(f.log_zero_guard_value_fn(f.window.new_zeros(1)))
    marker = {"n_fft": f.n_fft, "hop_length": f.hop_length, "win_length": f.win_length,
              "preemph": f.preemph, "mag_power": f.mag_power, "log_zero_guard": guard,
              "n_mels": f.fb.shape[1]}
    return FeatureConfig.from_export(marker, npz)


def nemo_features(model: Any, audio: np.ndarray) -> np.ndarray:
    import torch

    with torch.inference_mode():
        feats, length = model.preprocessor(input_signal=torch.from_numpy(audio)[None],
                                           length=torch.tensor([audio.size]))
    return feats[0, :, : int(length[0])].T.numpy()


@pytest.mark.parametrize("pieces", ["0.1", "0.5", "3", "random"])
def test_numpy_features_equal_nemo(model: Any, tmp_path: Path, pieces: str) -> None:
    audio = speechlike(20.0, seed=3)[: 20 * SR - 77]
    cfg = config_from_npz(model, tmp_path)
    live = NumpyFeatures(cfg)
    rng = np.random.default_rng(7)
    out, i = [], 0
    while i < audio.size:
        if pieces == "random":
            n = int(rng.choice([0, 1, 159, 160, 161, 1000, 23456]))
        else:
            n = int(float(pieces) * SR)
        out.append(live.push(audio[i : i + n]))
        i += n
    out.append(live.finish())
    got = np.concatenate(out)
    want = nemo_features(model, audio)
    assert got.dtype == np.float32 and got.shape == want.shape
    diff = float(np.abs(got - want).max())
    print(f"numpy vs NeMo features, {pieces} s pieces: max abs diff {diff:.2e}")
    assert diff <= 1e-4


def test_a_bad_feature_config_is_refused_naming_the_problem(tmp_path: Path) -> None:
    np.savez(tmp_path / "features.npz", window=np.ones(10, np.float32), fb=np.ones((4, 257), np.float32))
    base = {"n_fft": 512, "hop_length": 160, "win_length": 400, "preemph": 0.97, "mag_power": 2.0,
            "log_zero_guard": 2**-24, "n_mels": 4}
    with pytest.raises(ValueError, match="window has 10 samples"):
        FeatureConfig.from_export(base, tmp_path / "features.npz")
    no_hop = {k: v for k, v in base.items() if k != "hop_length"}
    with pytest.raises(ValueError, match="hop_length"):
        FeatureConfig.from_export(no_hop, tmp_path / "features.npz")
    with pytest.raises(ValueError, match="unusable"):
        FeatureConfig.from_export(base, tmp_path / "missing.npz")
