"""The model cache directory (`NEMO_CACHE_DIR`), the one error of model handling, and
crash-safe writes into the cache.

The cache directory must be this user's or root's: the seed's default (`$TMPDIR/nemo_cache`,
`/tmp/nemo_cache`) is in a directory every local user can write, so it is created 0700, and one
that another user made first is refused (`check_cache_dir`): a model is a pickle inside a tar.

Writes survive a power cut half-way: a file is written to a temporary name, fsynced and
renamed (`write_json`), a folder is swapped in by renames (`replace_folder`), and the parent
directory is fsynced after each rename (`fsync_dir`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

SPACE_MARGIN = 64 * 1024 * 1024  # left free on the disk after a download or an unpack


class ModelUnavailable(Exception):
    """The diarization model cannot be used; `str()` is a one-line operator-facing reason."""


def first_line(exc: BaseException) -> str:
    """The first line of `exc`'s message, or its type's name when it has none (for reasons
    that must fit one line)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_cache_dir(cache: Path) -> None:
    """Create `cache` (mode 0700, parents as needed) or check that this user or root owns it.

    Raises `ModelUnavailable` naming the directory and its owner when another user does: a
    model (a pickle inside a tar) must never be loaded from a directory someone else controls.
    """
    try:
        cache.mkdir(mode=0o700, parents=True, exist_ok=True)
        owner = cache.stat().st_uid
    except OSError as exc:
        raise ModelUnavailable(f"NEMO_CACHE_DIR={cache}: {exc.strerror or exc}") from exc
    if owner not in (os.geteuid(), 0):
        raise ModelUnavailable(
            f"NEMO_CACHE_DIR={cache} is owned by {_user_name(owner)}, not by this user "
            f"({_user_name(os.geteuid())}) or root: refusing to use it; remove it, or set "
            "NEMO_CACHE_DIR to a directory of your own"
        )


def _user_name(uid: int) -> str:
    import pwd

    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def pin_mismatch(path: Path, sha: str, pin: str) -> str:
    """The one-line reason for a file whose SHA-256 `sha` is not the pinned `pin`."""
    return f"{path}: SHA-256 {sha} does not match EDGE_MODEL_SHA256={pin}"


def replace_folder(tmp: Path, folder: Path) -> None:
    """Put the complete folder `tmp` in the place of `folder` (which may exist), by renames in
    the same parent, so a reader sees the old folder or the new one, never a mix. The old one
    is deleted afterwards. Raises `OSError`."""
    old = folder.with_name(f".old-{folder.name}-{os.getpid()}")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    fsync_dir(folder.parent)
    shutil.rmtree(old, ignore_errors=True)


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`, or None when it is missing, unreadable or not an object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def write_json(path: Path, value: dict[str, Any]) -> None:
    """Replace `path` with `value` as JSON, all or nothing (temp file, fsync, rename); the
    caller fsyncs the folder when the rename itself must survive. Raises `OSError`."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        json.dump(value, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_dir(path: Path) -> None:
    """Make the renames in folder `path` durable; best effort (a folder that cannot be opened
    is skipped: the data files themselves were fsynced)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = [
    "SPACE_MARGIN",
    "ModelUnavailable",
    "check_cache_dir",
    "first_line",
    "fsync_dir",
    "pin_mismatch",
    "read_json",
    "replace_folder",
    "write_json",
]
