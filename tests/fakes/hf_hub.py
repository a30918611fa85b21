"""A local stand-in for the Hugging Face Hub's file endpoint (`HF_ENDPOINT=http://127.0.0.1:PORT`).

It answers `HEAD`/`GET /{repo}/resolve/{revision}/{filename}` with the headers the real
`huggingface_hub` client reads (`X-Repo-Commit`, `X-Linked-Etag` = the file's SHA-256 as for
LFS files, `X-Linked-Size`), honours `Range: bytes=N-` for resumed downloads, and records every
request so tests can see what the client asked for. `cut_after` drops the connection after that
many body bytes once, to test resuming. `redirect_to` (another FakeHub's endpoint) answers a
known file with a 302 to the same path on that host, with the file's headers, as the Hub does
for LFS files it serves from its CDN; `auth` records each request's Authorization header.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class FakeHub:
    files: dict[str, bytes]  # "owner/name/filename" -> content
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # method, path, Range
    claimed_size: int | None = None  # lie about the size (free-space checks)
    cut_after: int | None = None  # drop the first GET after this many bytes
    redirect_to: str | None = None  # a CDN's endpoint: 302 there for every known file
    auth: list[tuple[str, str | None]] = field(default_factory=list)  # path, Authorization

    def __post_init__(self) -> None:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                self._serve(body=False)

            def do_GET(self) -> None:
                self._serve(body=True)

            def _serve(self, body: bool) -> None:
                hub.requests.append((self.command, self.path, self.headers.get("Range")))
                hub.auth.append((self.path, self.headers.get("Authorization")))
                parts = self.path.split("?")[0].strip("/").split("/")
                # owner / name / "resolve" / revision / filename
                key = "/".join(parts[:2] + parts[4:]) if len(parts) >= 5 and parts[2] == "resolve" else ""
                if key not in hub.files:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = hub.files[key]
                if hub.redirect_to is not None:
                    self.send_response(302)
                    self.send_header("Location", hub.redirect_to + self.path)
                    self.send_header("X-Repo-Commit", COMMIT)
                    self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                    self.send_header("X-Linked-Etag", f'"{hashlib.sha256(data).hexdigest()}"')
                    self.send_header("X-Linked-Size", str(len(data)))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = 0
                rng = self.headers.get("Range")
                if rng and rng.startswith("bytes=") and body:
                    start = int(rng[6:].split("-")[0])
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("X-Linked-Etag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("X-Linked-Size", str(hub.claimed_size or len(data)))
                self.send_header("Accept-Ranges", "bytes")
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                if not body:
                    return
                payload = data[start:]
                if hub.cut_after is not None:
                    cut, hub.cut_after = hub.cut_after, None
                    self.wfile.write(payload[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve_file(repo: str, path: Path) -> FakeHub:
    """A hub holding `path` as `<repo>/<repo name>.nemo` (how NeMo publishes checkpoints)."""
    return FakeHub({f"{repo}/{repo.rsplit('/', 1)[-1]}.nemo": path.read_bytes()})
