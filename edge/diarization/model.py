"""Find, fetch and verify the Sortformer checkpoint; the worker's memory helpers.

Resolution order (docs/ARCHITECTURE.md): `NEMO_DIAR_MODEL_PATH` (must exist) -> the pinned
repo's `.nemo` in `NEMO_CACHE_DIR` -> a download of that file from Hugging Face (unless
`HF_HUB_OFFLINE=1` or `EDGE_MODEL_DOWNLOAD=false`). A `.nemo` is a tar holding a pickle, so only
the configured path or the pinned repo's file is ever loaded, `EDGE_MODEL_SHA256` is checked
before anything is unpacked, and torch's weights-only unpickler is never switched off.

The parts, each in its own module and re-exported here for callers:
- `cache.py`: `ModelUnavailable`, the cache directory's ownership check, crash-safe writes;
- `download.py`: the resumable, checked download from the Hub;
- `unpack.py`: `extract_model`, unpack once and check the unpacked copy on later starts.

Every hash goes through `digests.file_sha256` (one cache per process, handed from a worker to
its successor while the files are unchanged: see `edge.diarization.digests`).

Every failure is a `ModelUnavailable` whose `str()` is one line for the operator. Nothing here
imports torch or NeMo: loading is the worker's (`worker/loading.py`).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
from pathlib import Path

from edge.diarization.cache import (
    SPACE_MARGIN,
    ModelUnavailable,
    check_cache_dir,
    first_line,
    pin_mismatch,
    replace_folder,
)
from edge.diarization.digests import file_sha256
from edge.diarization.download import Progress, download
from edge.diarization.unpack import extract_model, remove_dead_temporaries
from edge.settings import Settings


def cached_model_path(settings: Settings) -> Path:
    """Where the pinned repo's checkpoint lives in the cache: `NEMO_CACHE_DIR/<name>.nemo`."""
    return settings.nemo_cache_dir / _repo_filename(settings.edge_model_repo)


def resolve_model(settings: Settings, progress: Progress | None = None) -> Path:
    """`NEMO_DIAR_MODEL_PATH` -> `.nemo` in `NEMO_CACHE_DIR` -> HF download (unless offline/disabled).

    Verifies `EDGE_MODEL_SHA256` when set. `progress(done_bytes, total_bytes)` is called while
    downloading. Returns the local `.nemo` path. Raises `ModelUnavailable(reason)`, also for a
    cache dir that another user owns (`check_cache_dir`).
    """
    check_cache_dir(settings.nemo_cache_dir)
    if settings.nemo_diar_model_path is not None:
        path = settings.nemo_diar_model_path
        if not path.is_file():
            raise ModelUnavailable(f"NEMO_DIAR_MODEL_PATH={path}: file does not exist")
        _check_pin(path, settings)
        return path
    cached = cached_model_path(settings)
    if cached.is_file():
        _check_pin(cached, settings)
        return cached
    if settings.hf_hub_offline or not settings.edge_model_download:
        why = "HF_HUB_OFFLINE=1" if settings.hf_hub_offline else "EDGE_MODEL_DOWNLOAD=false"
        raise ModelUnavailable(
            f"no model: NEMO_DIAR_MODEL_PATH is unset, {cached} does not exist and downloads are off ({why})"
        )
    path = download(settings, cached, progress)
    _check_pin(path, settings)
    return path


def _check_pin(path: Path, settings: Settings) -> None:
    if settings.edge_model_sha256:
        pin = settings.edge_model_sha256.lower()
        sha = file_sha256(path)
        if sha != pin:
            raise ModelUnavailable(pin_mismatch(path, sha, pin))


def _repo_filename(repo: str) -> str:
    # NeMo publishes `<org>/<name>` as `<name>.nemo` at the repo root.
    return repo.rsplit("/", 1)[-1] + ".nemo"


def trim_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc `malloc_trim`)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim with
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def rss_bytes() -> int:
    """This process's resident set size, from /proc (0 where there is none)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


__all__ = [
    "SPACE_MARGIN",
    "ModelUnavailable",
    "cached_model_path",
    "check_cache_dir",
    "extract_model",
    "file_sha256",
    "first_line",
    "remove_dead_temporaries",
    "replace_folder",
    "resolve_model",
    "rss_bytes",
    "trim_memory",
]
