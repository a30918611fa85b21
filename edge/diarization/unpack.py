"""Unpack a `.nemo` once into the cache, and check the unpacked copy on every later start.

NeMo's `restore_from` unpacks the whole archive (~470 MB) into a temp dir on every start, which
wears out an SD card. `extract_model` unpacks it once into `NEMO_CACHE_DIR/extracted/<name>/`,
writes a marker (source path, size, mtime, SHA-256, each file's size and SHA-256) last, and later
starts load from that folder (through NeMo's own `SaveRestoreConnector.model_extracted_dir`, in
`worker/loading.py`), after checking every file against the marker's hashes (a copy changed on
disk is unpacked again). Unpacking runs under an exclusive lock (`extracted/.lock`), which also
removes the temporaries (`.tmp-`/`.old-<name>-<pid>`) of a process that died mid-unpack
(SIGKILL, power loss). The tar is read with the "data" filter: no absolute paths, no links out
of the folder, no devices.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edge.diarization.cache import (
    SPACE_MARGIN,
    ModelUnavailable,
    check_cache_dir,
    first_line,
    pin_mismatch,
    read_json,
    replace_folder,
    write_json,
)
from edge.diarization.digests import file_sha256
from edge.settings import Settings

MARKER = "edge-extracted.json"
LOCK = ".lock"  # in NEMO_CACHE_DIR/extracted/: one unpack at a time (worker, `edge model fetch`)
_TEMPORARY = re.compile(r"^\.(?:tmp|old)-.+-(\d+)$")  # .tmp-<name>-<pid>, .old-<name>-<pid>
REQUIRED_MEMBERS = ("model_config.yaml", "model_weights.ckpt")


def extract_model(path: Path, settings: Settings) -> Path:
    """Unpack `path` once into `NEMO_CACHE_DIR/extracted/<name>/` and return that folder.

    Reuses the folder when its marker matches the source (path, size, mtime, and the pinned
    SHA-256 if any) and every recorded file still has its size and SHA-256. Runs under the
    cache lock, and first removes dead processes' unpack temporaries. Raises `ModelUnavailable`.
    """
    check_cache_dir(settings.nemo_cache_dir)
    try:
        st = path.stat()
    except OSError as exc:
        raise ModelUnavailable(f"{path}: {exc.strerror or exc}") from exc
    root = settings.nemo_cache_dir / "extracted"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelUnavailable(f"NEMO_CACHE_DIR={settings.nemo_cache_dir}: {exc.strerror or exc}") from exc
    with _cache_lock(root):
        remove_dead_temporaries(root)
        return _extract_locked(path, st, root, settings)


def _extract_locked(path: Path, st: os.stat_result, root: Path, settings: Settings) -> Path:
    folder = root / path.name.removesuffix(".nemo")
    pin = settings.edge_model_sha256.lower() if settings.edge_model_sha256 else None
    marker = _read_marker(folder)
    if marker is not None and _marker_matches(marker, folder, path, st, pin):
        return folder
    sha = file_sha256(path)
    if pin is not None and sha != pin:
        raise ModelUnavailable(pin_mismatch(path, sha, pin))
    tmp = root / f".tmp-{folder.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        files = _unpack(path, tmp)
        write_json(tmp / MARKER, {
            "source": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "sha256": sha, "files": files, "extracted_at": time.time(),
        })
        replace_folder(tmp, folder)
        for name in files:  # hashed under tmp: known by identity, now under the names to report
            file_sha256(folder / name)
    except OSError as exc:
        raise ModelUnavailable(f"cannot unpack {path} into {root}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def remove_dead_temporaries(root: Path) -> list[str]:
    """Remove `.tmp-<name>-<pid>` / `.old-<name>-<pid>` folders in `root` whose process is gone
    (killed mid-unpack: ~470 MB each). Call it under the cache lock. Returns the names removed."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(root):
            m = _TEMPORARY.match(entry.name)
            if m and entry.is_dir(follow_symlinks=False) and not _pid_alive(int(m.group(1))):
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(entry.name)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


@contextlib.contextmanager
def _cache_lock(root: Path) -> Iterator[None]:
    """An exclusive flock on `root/.lock`, held for the block (the kernel drops it if we die)."""
    try:
        fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ModelUnavailable(f"cannot lock {root / LOCK}: {exc.strerror or exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _unpack(path: Path, out: Path) -> dict[str, dict[str, Any]]:
    """Extract the archive safely into `out`; returns {relative path: {"size", "sha256"}}."""
    try:
        with tarfile.open(path, "r:*") as tar:
            members = [m for m in tar.getmembers() if m.isfile()]
            names = {os.path.normpath(m.name) for m in members}
            missing = [n for n in REQUIRED_MEMBERS if n not in names]
            if missing:
                raise ModelUnavailable(f"{path}: not a .nemo checkpoint (missing {', '.join(missing)})")
            total = sum(m.size for m in members)
            out.mkdir(parents=True)
            free = shutil.disk_usage(out).free
            if free < total + SPACE_MARGIN:
                raise ModelUnavailable(
                    f"not enough free space in {out.parent} to unpack {path.name}: "
                    f"need {total / 1e9:.2f} GB, have {free / 1e9:.2f} GB"
                )
            # The "data" filter refuses absolute paths, links out of the folder, devices.
            tar.extractall(out, members=members, filter="data")
    except ModelUnavailable:
        raise
    except (tarfile.TarError, EOFError, ValueError) as exc:
        raise ModelUnavailable(f"{path}: not a valid .nemo archive ({type(exc).__name__}: "
                               f"{first_line(exc)})") from exc
    files = {}
    for p in sorted(out.rglob("*")):
        if p.is_file():
            with p.open("rb") as f:
                os.fsync(f.fileno())
            files[str(p.relative_to(out))] = {"size": p.stat().st_size, "sha256": file_sha256(p)}
    return files


def _read_marker(folder: Path) -> dict[str, Any] | None:
    return read_json(folder / MARKER)


def _marker_matches(marker: dict[str, Any], folder: Path, path: Path, st: os.stat_result,
                    pin: str | None) -> bool:
    if (marker.get("source"), marker.get("size"), marker.get("mtime_ns")) != (
        str(path.resolve()), st.st_size, st.st_mtime_ns
    ):
        return False
    if pin is not None and marker.get("sha256") != pin:
        return False
    files = marker.get("files") or {}
    if not all(n in {os.path.normpath(f) for f in files} for n in REQUIRED_MEMBERS):
        return False
    for name, entry in files.items():
        p = folder / name
        if not isinstance(entry, dict) or not p.is_file() or p.stat().st_size != entry.get("size"):
            return False
        if file_sha256(p) != entry.get("sha256"):  # changed in place: same size, other bytes
            return False
    return True


__all__ = ["LOCK", "MARKER", "REQUIRED_MEMBERS", "extract_model", "remove_dead_temporaries"]
