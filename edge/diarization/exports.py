"""Find and verify an ONNX export of the streaming Sortformer step (daemon side: no torch, no
onnxruntime).

`edge model export` (worker/export.py) writes one folder per source checkpoint,
`NEMO_CACHE_DIR/exported/<model file stem>-<first 12 hex of its SHA-256>/`, holding
`model.onnx` (fp32), optionally `model.int8.onnx`, `features.npz` (the checkpoint's STFT window
and mel filterbank) and, written last, the marker `edge-export.json`:

    source_sha256, source_name, versions {nemo, torch, onnx, onnxruntime}, opset,
    graph_version, inputs, outputs (name lists), features {...}, streaming {...},
    files {filename: {size, sha256}}, created (ISO time)

A folder without a readable marker is not an export. `find_export` refuses, with a one-line
reason, an export that is missing, truncated or altered (a size or SHA-256 differs from the
marker), whose marker is corrupt, that lacks the asked precision, or that was made from another
checkpoint. The graph's interface (input/output names) is defined here once, for the builder and
the runtime.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from edge.diarization.cache import ModelUnavailable, fsync_dir, write_json
from edge.diarization.digests import file_sha256
from edge.settings import Settings

Precision = Literal["fp32", "int8"]
MARKER = "edge-export.json"
FEATURES_FILE = "features.npz"
ONNX_FILES: dict[str, str] = {"fp32": "model.onnx", "int8": "model.int8.onnx"}
INPUTS = ("chunk", "chunk_lengths", "spkcache", "spkcache_lengths", "fifo", "fifo_lengths")
OUTPUTS = ("preds", "chunk_embs", "chunk_embs_lengths", "hidden")
OPSET = 17
# The marker's `graph_version`: bumped when `edge model export` writes a different graph for the
# same checkpoint. 2: attention blocks fused into MultiHeadAttention, int8 of every weight
# product with 7-bit weights. An export without it (or an older one) still computes the same
# numbers; `edge model export` makes it again instead of saying `unchanged`.
GRAPH_VERSION = 2
SHA_PREFIX = 12
# Marker key -> the JSON type it must have.
MARKER_KEYS: dict[str, type] = {
    "source_sha256": str, "source_name": str, "versions": dict, "opset": int, "inputs": list,
    "outputs": list, "features": dict, "streaming": dict, "files": dict, "created": str,
}


@dataclass(frozen=True)
class Export:
    """A verified export: its folder, the ONNX file for the asked precision, the marker."""

    folder: Path
    onnx: Path
    precision: Precision
    marker: dict[str, Any]

    @property
    def features(self) -> Path:
        """`features.npz`: `window` and `fb` (mel filterbank) as float32, from the checkpoint."""
        return self.folder / FEATURES_FILE


def export_dir(settings: Settings, model_path: Path, sha256: str | None = None) -> Path:
    """Where the export of the checkpoint at `model_path` lives:
    `NEMO_CACHE_DIR/exported/<stem>-<first 12 hex of its SHA-256>/`.

    `sha256` saves hashing the file when the caller has it. Raises `ModelUnavailable` when the
    checkpoint cannot be read.
    """
    digest = sha256 or _source_sha256(model_path)
    stem = model_path.name.removesuffix(".nemo")
    return settings.nemo_cache_dir / "exported" / f"{stem}-{digest[:SHA_PREFIX]}"


def find_export(
    settings: Settings,
    model_path: Path,
    precision: Precision = "fp32",
    *,
    folder: Path | None = None,
    check_hashes: bool = True,
) -> Export:
    """The verified export of `model_path` for `precision`, from `folder` (default `export_dir`).

    Checks: the marker parses and has every key with its type; it was made from this
    checkpoint's SHA-256; it has this graph interface; the precision's ONNX file and
    `features.npz` are listed; every listed file exists with its recorded size and (unless
    `check_hashes` is false: ~1 s per GB saved) its SHA-256.
    Raises `ModelUnavailable` with a one-line reason.
    """
    if precision not in ONNX_FILES:
        raise ModelUnavailable(f"unknown precision {precision!r} ({' | '.join(ONNX_FILES)})")
    sha = _source_sha256(model_path)
    folder = folder if folder is not None else export_dir(settings, model_path, sha)
    marker = read_marker(folder)
    if marker.get("source_sha256") != sha:
        raise ModelUnavailable(
            f"export {folder} was made from SHA-256 {marker.get('source_sha256')}, "
            f"not from {model_path.name} ({sha}): run `edge model export`"
        )
    for key, names in (("inputs", INPUTS), ("outputs", OUTPUTS)):
        if tuple(marker[key]) != names:
            raise ModelUnavailable(
                f"export {folder}: {key} {marker[key]} are not {list(names)} (made by another "
                "version of edge): run `edge model export`"
            )
    files: dict[str, Any] = marker["files"]
    name = ONNX_FILES[precision]
    if name not in files:
        hint = " --quantize int8" if precision == "int8" else ""
        raise ModelUnavailable(f"export {folder} has no {precision} model ({name}): "
                               f"run `edge model export{hint}`")
    if FEATURES_FILE not in files:
        raise ModelUnavailable(f"export {folder}: marker lists no {FEATURES_FILE}")
    for fname, meta in files.items():
        _check_file(folder, fname, meta, check_hashes)
    return Export(folder=folder, onnx=folder / name, precision=precision, marker=marker)


def export_status(settings: Settings, model_path: Path | None,
                  precision: Precision = "fp32") -> tuple[Export | None, str]:
    """For `edge check` and the runtime choice: `(export, "")` when a verified export of
    `model_path` for `precision` exists, else `(None, one-line reason)`. Never raises."""
    if model_path is None:
        return None, "no model to match an export against"
    try:
        return find_export(settings, model_path, precision), ""
    except ModelUnavailable as exc:
        return None, str(exc)


def read_marker(folder: Path) -> dict[str, Any]:
    """The marker of the export in `folder`, with every key of `MARKER_KEYS` of its type.

    Raises `ModelUnavailable` when the folder or marker is missing or the marker is corrupt.
    """
    path = folder / MARKER
    if not folder.is_dir():
        raise ModelUnavailable(f"no export in {folder}: run `edge model export`")
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ModelUnavailable(f"export {folder} is incomplete (no {MARKER}): "
                               "run `edge model export`") from None
    except OSError as exc:
        raise ModelUnavailable(f"{path}: {exc.strerror or exc}") from exc
    try:
        marker = json.loads(text)
    except ValueError as exc:
        raise ModelUnavailable(f"{path} is corrupt (not JSON: {exc})") from exc
    if not isinstance(marker, dict):
        raise ModelUnavailable(f"{path} is corrupt (not a JSON object)")
    for key, kind in MARKER_KEYS.items():
        if not isinstance(marker.get(key), kind) or (kind is int and isinstance(marker[key], bool)):
            raise ModelUnavailable(f"{path} is corrupt ({key!r} missing or not a {kind.__name__})")
    return marker


def file_entry(path: Path) -> dict[str, Any]:
    """`{size, sha256}` of a file, as the marker's `files` records it."""
    return {"size": path.stat().st_size, "sha256": file_sha256(path)}


def write_marker(folder: Path, marker: dict[str, Any]) -> None:
    """Write the marker into `folder` durably (temp file, fsync, rename, fsync of the folder).

    The builder calls this last, after every listed file is complete. Raises `ValueError`
    when a key of `MARKER_KEYS` is missing or of the wrong type, `OSError` from the disk.
    """
    for key, kind in MARKER_KEYS.items():
        if not isinstance(marker.get(key), kind):
            raise ValueError(f"marker key {key!r} missing or not a {kind.__name__}")
    write_json(folder / MARKER, marker)
    fsync_dir(folder)


# --- internals ---

def _source_sha256(model_path: Path) -> str:
    try:
        return file_sha256(model_path)
    except OSError as exc:
        raise ModelUnavailable(f"{model_path}: {exc.strerror or exc}") from exc


def _check_file(folder: Path, name: str, meta: Any, check_hashes: bool) -> None:
    if (not isinstance(meta, dict) or not isinstance(meta.get("size"), int)
            or not isinstance(meta.get("sha256"), str) or Path(name).name != name):
        raise ModelUnavailable(f"{folder / MARKER} is corrupt (files[{name!r}] is not "
                               "{size, sha256} of a file in the folder)")
    path = folder / name
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ModelUnavailable(f"export {folder}: {name}: {exc.strerror or exc}") from exc
    if size != meta["size"]:
        raise ModelUnavailable(f"export {folder}: {name} is truncated or altered "
                               f"({size} bytes, the marker says {meta['size']})")
    if check_hashes:
        digest = _source_sha256(path)
        if digest != meta["sha256"]:
            raise ModelUnavailable(f"export {folder}: {name} is altered (SHA-256 {digest}, "
                                   f"the marker says {meta['sha256']})")


__all__ = [
    "FEATURES_FILE",
    "GRAPH_VERSION",
    "INPUTS",
    "MARKER",
    "ONNX_FILES",
    "OPSET",
    "OUTPUTS",
    "Export",
    "Precision",
    "export_dir",
    "export_status",
    "file_entry",
    "find_export",
    "read_marker",
    "write_marker",
]
