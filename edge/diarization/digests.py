"""File SHA-256s, verified once per daemon life rather than once per worker start.

Every hash check of the model files (the `EDGE_MODEL_SHA256` pin and the extracted copy's
marker in `model`, an export's files in `exports`) goes through `file_sha256`, i.e. through
this process's one `DigestCache`, keyed by the file's stat identity. A worker reports what it
verified (`digest_report`, in READY); the supervisor keeps the last report in memory and sends
it in the next LOAD; the new worker `seed_digests` it, and reuses a digest only while the file's
identity is exactly the recorded one. So a SIGKILLed worker's successor does not re-read ~1 GB
of model files, and a file written since is hashed again. Nothing here imports torch or NeMo.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections import deque
from pathlib import Path
from typing import Any

MAX_DIGESTS = 32  # files a worker reports as verified (a .nemo, its extracted copy, an export)
# A file's stat identity: (st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns). Any write changes
# ctime (a replacement the inode), so an equal identity is the same bytes, under any name (a
# file hashed in an unpack's temporary folder is known once that folder is renamed into place).
Identity = tuple[int, int, int, int, int]
# A file changed less than this before it was hashed may be changed again within the same
# timestamp tick, keeping its identity (git's "racy clean"): its digest is used in this process
# but not handed to the next one, which hashes it once more.
RACY_NS = 1_000_000_000


class DigestCache:
    """The one memory of file SHA-256s (hex) in a process, keyed by stat identity (`Identity`).

    Every hash check (the `EDGE_MODEL_SHA256` pin, the extracted copy's marker, an export's
    files) asks `sha256`, so a file whose identity changed since it was hashed is hashed again.
    A worker reports `verified()` in READY; the supervisor sends that back in the next LOAD
    and the new worker `seed`s it, so a restart does not re-read ~0.5 GB it read a moment ago.
    A write during the hash is caught by a re-stat; one within a timestamp tick of it could
    keep the identity, so a file changed under `RACY_NS` before its hash is not reported.
    """

    def __init__(self) -> None:
        # identity -> (path last seen, sha256, whether it may be handed on: not racy)
        self._known: dict[Identity, tuple[str, str, bool]] = {}
        self._seeded: set[Identity] = set()
        # The latest paths read and hashed in this process / served from the seed instead.
        self.hashed: deque[str] = deque(maxlen=MAX_DIGESTS)
        self.reused: deque[str] = deque(maxlen=MAX_DIGESTS)

    def sha256(self, path: Path) -> str:
        """SHA-256 of the file at `path`. Raises `OSError` (missing, unreadable)."""
        name, key = _identity(path)
        if key in self._known:
            if key in self._seeded:
                self._seeded.discard(key)
                self.reused.append(name)
            _, digest, settled = self._known.pop(key)
        else:
            started = time.time_ns()
            digest = _sha256_of(path)
            self.hashed.append(name)
            if _identity(path)[1] != key:  # changed while being read: not worth remembering
                return digest
            settled = key[4] < started - RACY_NS
        self._known[key] = (name, digest, settled)  # (re)inserted last: `verified` keeps the newest
        return digest

    def seed(self, entries: object) -> int:
        """Trust `entries` (a `verified()` list from an earlier process) for the files whose stat
        identity is still exactly the recorded one; malformed entries are ignored. Returns how
        many were taken (at most `MAX_DIGESTS`)."""
        taken = 0
        for entry in entries if isinstance(entries, list) else []:
            try:
                recorded = tuple(int(entry[k]) for k in _STAT_FIELDS)
                sha = str(entry["sha256"])
                name, now = _identity(Path(str(entry["path"])))
            except (KeyError, TypeError, ValueError, OSError):
                continue
            if now == recorded and len(sha) == 64 and taken < MAX_DIGESTS:
                self._known[now] = (name, sha, True)
                self._seeded.add(now)
                taken += 1
        return taken

    def verified(self) -> list[dict[str, Any]]:
        """The remembered digests, but racy ones, whose files still have their identity under the
        name last seen (at most `MAX_DIGESTS`, newest last), as `seed` takes them."""
        out = []
        settled = [(key, name, sha) for key, (name, sha, ok) in self._known.items() if ok]
        for key, name, sha in settled[-MAX_DIGESTS:]:
            with contextlib.suppress(OSError):
                if _identity(Path(name))[1] == key:
                    out.append({"path": name, **dict(zip(_STAT_FIELDS, key, strict=True)), "sha256": sha})
        return out


_STAT_FIELDS = ("st_dev", "st_ino", "st_size", "st_mtime_ns", "st_ctime_ns")
_digests = DigestCache()


def _identity(path: Path) -> tuple[str, Identity]:
    resolved = path.resolve()
    st = resolved.stat()
    return str(resolved), (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def file_identity(path: Path) -> list[Any]:
    """`[resolved path, *Identity]` of the file at `path`, as JSON keeps it: equal for the same
    bytes under the same name (any write moves ctime). Raises `OSError`."""
    name, key = _identity(path)
    return [name, *key]


def file_sha256(path: Path) -> str:
    """SHA-256 of a file (hex), through this process's `DigestCache`. Raises `OSError`."""
    return _digests.sha256(path)


def seed_digests(entries: object) -> int:
    """Seed this process's digest cache (see `DigestCache.seed`). Returns how many were taken."""
    return _digests.seed(entries)


def digest_report() -> dict[str, Any]:
    """What this process verified: `digests` (for the next worker's seed), and the paths it
    `hashed` itself vs `reused` from a seed."""
    return {"digests": _digests.verified(), "hashed": list(_digests.hashed),
            "reused": list(_digests.reused)}


def _sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(4 * 1024 * 1024):
            h.update(block)
    return h.hexdigest()


__all__ = ["MAX_DIGESTS", "RACY_NS", "DigestCache", "digest_report", "file_identity", "file_sha256",
           "seed_digests"]
