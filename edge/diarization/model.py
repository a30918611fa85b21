"""Find, fetch, verify and load the Sortformer checkpoint.

Resolution order (ARCHITECTURE.md): `NEMO_DIAR_MODEL_PATH` (must exist) -> the pinned repo's
`.nemo` in `NEMO_CACHE_DIR` -> a download of that file from Hugging Face (unless
`HF_HUB_OFFLINE=1` or `EDGE_MODEL_DOWNLOAD=false`). A `.nemo` is a tar holding a pickle, so only
the configured path or the pinned repo's file is ever loaded, `EDGE_MODEL_SHA256` is checked
before anything is unpacked, and torch's weights-only unpickler is never switched off.

NeMo's `restore_from` unpacks the whole archive (~470 MB) into a temp dir on every start, which
wears out an SD card. `load_model` unpacks it once into `NEMO_CACHE_DIR/extracted/<name>/`,
writes a marker (source path, size, mtime, SHA-256, each file's size and SHA-256) last, and later
starts load from that folder through NeMo's own `SaveRestoreConnector.model_extracted_dir`, after
checking every file against the marker's hashes (a copy changed on disk is unpacked again).
Unpacking runs under an exclusive lock (`extracted/.lock`), which also removes the temporaries
(`.tmp-`/`.old-<name>-<pid>`) of a process that died mid-unpack (SIGKILL, power loss).

The cache directory itself must be this user's or root's: the seed's default
(`$TMPDIR/nemo_cache`, `/tmp/nemo_cache`) is in a directory every local user can write, so it is
created 0700, and one that another user made first is refused (`check_cache_dir`).

Every hash goes through `digests.file_sha256` (one cache per process, handed from a worker to
its successor while the files are unchanged: see `edge.diarization.digests`).

Every failure is a `ModelUnavailable` whose `str()` is one line for the operator. Nothing here
imports torch or NeMo: loading is the worker's (`worker/loading.py`).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import gc
import json
import os
import re
import shutil
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from edge.diarization.digests import file_sha256
from edge.settings import Settings

MARKER = "edge-extracted.json"
LOCK = ".lock"  # in NEMO_CACHE_DIR/extracted/: one unpack at a time (worker, `edge model fetch`)
_TEMPORARY = re.compile(r"^\.(?:tmp|old)-.+-(\d+)$")  # .tmp-<name>-<pid>, .old-<name>-<pid>
REQUIRED_MEMBERS = ("model_config.yaml", "model_weights.ckpt")
SPACE_MARGIN = 64 * 1024 * 1024
Progress = Callable[[int, int], None]



class ModelUnavailable(Exception):
    """The diarization model cannot be used; `str()` is a one-line operator-facing reason."""


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
    path = _download(settings, cached, progress)
    _check_pin(path, settings)
    return path


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
        raise ModelUnavailable(_pin_mismatch(path, sha, pin))
    tmp = root / f".tmp-{folder.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        files = _unpack(path, tmp)
        _write_json(tmp / MARKER, {
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


def replace_folder(tmp: Path, folder: Path) -> None:
    """Put the complete folder `tmp` in the place of `folder` (which may exist), by renames in
    the same parent, so a reader sees the old folder or the new one, never a mix. The old one
    is deleted afterwards. Raises `OSError`."""
    old = folder.with_name(f".old-{folder.name}-{os.getpid()}")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    _fsync_dir(folder.parent)
    shutil.rmtree(old, ignore_errors=True)


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


# --- internals ---

def _repo_filename(repo: str) -> str:
    # NeMo publishes `<org>/<name>` as `<name>.nemo` at the repo root.
    return repo.rsplit("/", 1)[-1] + ".nemo"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _user_name(uid: int) -> str:
    import pwd

    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


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


def _check_pin(path: Path, settings: Settings) -> None:
    if settings.edge_model_sha256:
        pin = settings.edge_model_sha256.lower()
        sha = file_sha256(path)
        if sha != pin:
            raise ModelUnavailable(_pin_mismatch(path, sha, pin))


def _pin_mismatch(path: Path, sha: str, pin: str) -> str:
    return f"{path}: SHA-256 {sha} does not match EDGE_MODEL_SHA256={pin}"


def _download(settings: Settings, dest: Path, progress: Progress | None) -> Path:
    """Fetch the pinned repo's `.nemo` into `dest`: resumable `<dest>.partial`, checked, renamed."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    repo, filename = settings.edge_model_repo, dest.name
    token = settings.hf_token.get_secret_value() if settings.hf_token else None
    url = hf_hub_url(repo, filename)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        meta = get_hf_file_metadata(url, token=token)
    except Exception as exc:  # HTTP status, DNS, connection refused, timeouts: all one line
        raise ModelUnavailable(f"cannot download {repo}/{filename}: {type(exc).__name__}: "
                               f"{first_line(exc)}") from exc
    size = meta.size or 0
    partial = dest.with_name(dest.name + ".partial")
    info = dest.with_name(dest.name + ".partial.json")
    # A partial download continues only if it is of the same upstream file.
    stale = _read_json(info) != {"etag": meta.etag, "size": size}
    if stale or (partial.exists() and size and partial.stat().st_size > size):
        partial.unlink(missing_ok=True)
        _write_json(info, {"etag": meta.etag, "size": size})
    have = partial.stat().st_size if partial.exists() else 0
    # Room for the rest of the download and for unpacking it once.
    need = (size - have) + size + SPACE_MARGIN
    free = shutil.disk_usage(dest.parent).free
    if free < need:
        raise ModelUnavailable(
            f"not enough free space in {dest.parent}: need {need / 1e9:.2f} GB, have {free / 1e9:.2f} GB"
        )
    bar = _progress_class(progress)
    headers = build_hf_headers(token=token)
    if urlsplit(meta.location).netloc != urlsplit(url).netloc:
        # A redirect to another host (the CDN, with a signed URL): the token is the Hub's only.
        headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
    try:
        with partial.open("ab") as f:
            http_get(meta.location, f, resume_size=have, headers=headers,
                     expected_size=size or None, displayed_filename=filename, tqdm_class=bar)
            f.flush()
            os.fsync(f.fileno())
    except Exception as exc:
        # The partial file stays: the next attempt resumes from it.
        raise ModelUnavailable(f"download of {repo}/{filename} failed: {type(exc).__name__}: "
                               f"{first_line(exc)}") from exc
    sha = file_sha256(partial)
    if meta.etag and len(meta.etag) == 64 and sha != meta.etag.lower():
        # LFS files carry their SHA-256 as etag: this download is corrupt, start over next time.
        partial.unlink(missing_ok=True)
        raise ModelUnavailable(f"download of {repo}/{filename} is corrupt (SHA-256 {sha} != {meta.etag})")
    os.replace(partial, dest)
    info.unlink(missing_ok=True)
    _fsync_dir(dest.parent)
    return dest


def _progress_class(progress: Progress | None) -> type:
    """A tqdm-shaped class that huggingface_hub drives and that reports to `progress`."""

    class _Bar:
        def __init__(self, total: int | None = None, initial: int = 0, **_: Any) -> None:
            self.total, self.n = total or 0, initial
            self._report()

        def update(self, n: int = 1) -> None:
            self.n += n
            self._report()

        def _report(self) -> None:
            if progress is not None:
                progress(self.n, self.total)

        def close(self) -> None:
            pass

        def __enter__(self) -> _Bar:
            return self

        def __exit__(self, *exc: object) -> None:
            self.close()

    return _Bar


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
    return _read_json(folder / MARKER)


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


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _write_json(path: Path, value: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        json.dump(value, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


__all__ = [
    "ModelUnavailable",
    "cached_model_path",
    "check_cache_dir",
    "extract_model",
    "file_sha256",
    "remove_dead_temporaries",
    "replace_folder",
    "resolve_model",
    "rss_bytes",
    "trim_memory",
]
