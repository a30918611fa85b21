"""Download the pinned repo's `.nemo` from Hugging Face into the cache.

Through `huggingface_hub`'s own URL, metadata and HTTP functions, imported only when a download
starts. The file grows in `<name>.nemo.partial` (with `.partial.json` naming the upstream etag
and size), so a broken download resumes where it stopped, and only if the upstream file is the
same one; it is fsynced, checked against the LFS SHA-256 the Hub gives as etag, and renamed into
place. The token goes to the Hub only, never to the CDN host a download is redirected to.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from edge.diarization.cache import (
    SPACE_MARGIN,
    ModelUnavailable,
    first_line,
    fsync_dir,
    read_json,
    write_json,
)
from edge.diarization.digests import file_sha256
from edge.settings import Settings

Progress = Callable[[int, int], None]


def download(settings: Settings, dest: Path, progress: Progress | None) -> Path:
    """Fetch the pinned repo's `.nemo` into `dest` (resuming `<dest>.partial`), check it, rename
    it into place and return `dest`. `progress(done_bytes, total_bytes)` is called as bytes
    arrive. Raises `ModelUnavailable` (unreachable Hub, no room, a corrupt download)."""
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
    stale = read_json(info) != {"etag": meta.etag, "size": size}
    if stale or (partial.exists() and size and partial.stat().st_size > size):
        partial.unlink(missing_ok=True)
        write_json(info, {"etag": meta.etag, "size": size})
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
    fsync_dir(dest.parent)
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


__all__ = ["Progress", "download"]
