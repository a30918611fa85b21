"""Random-weight streaming Sortformer checkpoints, built once and cached for tests and benchmarks.

They come from the public v2 streaming architecture via `scripts/make_test_models.py` and are
real `.nemo` files, loaded through the production loader. Cached under `<repo>/.cache/test-models/`
(gitignored), named by a hash of the builder and the NeMo/torch versions, so a change rebuilds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
BUILDER = ROOT / "scripts" / "make_test_models.py"
CACHE = ROOT / ".cache" / "test-models"


def tiny_model_path() -> Path:
    """A tiny (0.3M parameters, ~1 MB) streaming Sortformer `.nemo`: seconds to build."""
    return _model("tiny")


def full_model_path() -> Path:
    """The full 117.7M-parameter (~470 MB) random-weight `.nemo`, for benchmarks."""
    return _model("full")


def _model(kind: str) -> Path:
    path = CACHE / f"{kind}-{_key()}.nemo"
    if not path.is_file():
        builder = _builder()
        config = builder.tiny_config() if kind == "tiny" else builder.FULL
        builder.build(config, path)  # writes to a temp name and renames: safe for parallel runs
    return path


def _key() -> str:
    import nemo
    import torch

    h = hashlib.sha256(BUILDER.read_bytes())
    h.update(f"{nemo.__version__}/{torch.__version__}".encode())
    return h.hexdigest()[:12]


def _builder() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_test_models", BUILDER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":  # python tests/fakes/sortformer.py [tiny|full]: print the path
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    print({"tiny": tiny_model_path, "full": full_model_path}[(sys.argv[1:] or ["tiny"])[0]]())
