"""What the benchmarks share: child processes (the daemon, the fake Google service), their
environment, reading the daemon's /metrics and /ready, and writing results (`emit`) with no
path that only means something on the machine that made them (`portable`)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
KEY = "bench-key"
ADMIN_KEY = "bench-admin-key"  # an operator key: /ready shows reasons and notices
FAKE_ENDPOINT_S = 0.3  # the fake's endpointing: a final comes this long after the last word
# Top-level folders whose paths mean the same on every machine: `portable` keeps them.
SYSTEM_DIRS = frozenset({"bin", "dev", "etc", "lib", "proc", "sys", "usr"})
# An absolute path inside a string: not right after a word, '.', '/', '-' or ':' (URLs).
_ABSOLUTE = re.compile(r"(?<![\w./:-])/[\w.+-]+(?:/[\w.+@-]+)*/?")


@contextmanager
def process(
    args: list[str], env: dict[str, str], ready: str, fd_limit: int | None = None,
) -> Iterator[tuple[subprocess.Popen[str], re.Match[str]]]:
    """A child process; yields (Popen, the first match of `ready` in its output). Its output
    keeps being read afterwards: a full pipe would block the child's log writer.
    `fd_limit`: the child's RLIMIT_NOFILE (what a unit without LimitNOFILE= gets is 1024)."""

    def limit_fds() -> None:
        if fd_limit is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (fd_limit, fd_limit))

    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=limit_fds)
    assert proc.stdout is not None
    match = None
    lines: list[str] = []
    for line in proc.stdout:
        lines.append(line)
        match = re.search(ready, line)
        if match:
            break
    if match is None:
        proc.kill()
        raise RuntimeError(f"{args} did not start:\n" + "".join(lines[-20:]))
    stdout = proc.stdout
    threading.Thread(target=lambda: [None for _ in stdout], daemon=True).start()
    try:
        yield proc, match
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def daemon_env(**settings: str) -> dict[str, str]:
    """The environment for `python -m edge serve`: ours only, nothing from the developer's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGE_", "STT_", "NEMO_"))}
    env.update({"EDGE_PORT": "0", "EDGE_API_KEYS": KEY, "EDGE_ADMIN_KEYS": ADMIN_KEY,
                "EDGE_ENV_FILE": "/dev/null",
                "EDGE_LOG_LEVEL": "INFO", "PYTHONUNBUFFERED": "1"})
    env.update(settings)
    return env


@contextmanager
def daemon(fd_limit: int | None = None, **settings: str) -> Iterator[tuple[int, str, str]]:
    """`python -m edge serve` with `settings`; yields (pid, http base, ws base)."""
    with process([sys.executable, "-m", "edge", "serve"], daemon_env(**settings),
                 r"listening on \S+:(\d+)", fd_limit) as (proc, m):
        port = m.group(1)
        yield proc.pid, f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}"


@contextmanager
def fake_google(endpoint_s: float = FAKE_ENDPOINT_S, word_code: str = "exact") -> Iterator[str]:
    """The fake Google Speech service in its own process; yields its "host:port"."""
    with process([sys.executable, "-m", "tests.fakes.google_speech", str(endpoint_s),
                  "--word-code", word_code],
                 dict(os.environ), r"(127\.0\.0\.1:\d+)") as (_proc, m):
        yield m.group(1)


def diarizer_settings(model: str) -> dict[str, str]:
    """Settings for the local diarizer with a random-weight test model ("tiny" | "full")."""
    sys.path.insert(0, str(ROOT))
    from tests.fakes.sortformer import full_model_path, tiny_model_path

    path = tiny_model_path() if model == "tiny" else full_model_path()
    return {"STT_ENABLE_NEMO_DIARIZATION_FALLBACK": "true", "NEMO_DIAR_MODEL_PATH": str(path),
            "EDGE_MODEL_DOWNLOAD": "false", "NEMO_CACHE_DIR": str(ROOT / ".cache" / "bench-nemo")}


async def metrics(http: str) -> dict[str, float]:
    """The daemon's /metrics as {"name{labels}": value}."""
    async with httpx.AsyncClient(timeout=30) as c:
        text = (await c.get(http + "/metrics", headers={"Authorization": f"Token {KEY}"})).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def portable(value: Any, roots: Sequence[Path] = (ROOT,)) -> Any:
    """`value` (JSON-like: dicts, lists, strings, numbers) with this machine's absolute paths
    rewritten wherever they appear in a string or a key (command lines, `plan` texts): under a
    repository checkout in `roots`, relative to it; elsewhere, by name, with the first 12 hex
    digits of its SHA-256 when it is a file still there: `model.onnx (sha256 0123456789ab)`.
    Paths under `SYSTEM_DIRS` and ones whose top folder does not exist here (`/v1/listen`)
    stay as they are."""
    if isinstance(value, dict):
        return {portable(k, roots): portable(v, roots) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [portable(v, roots) for v in value]
    if isinstance(value, str):
        return _ABSOLUTE.sub(lambda m: _portable_path(m.group(0), roots), value)
    return value


def _portable_path(text: str, roots: Sequence[Path]) -> str:
    path = PurePosixPath(text)
    for root in roots:
        if path.is_relative_to(root):
            return str(path.relative_to(root)) + ("/" if text.endswith("/") else "")
    top = path.parts[1]
    if top in SYSTEM_DIRS or not Path("/", top).is_dir():
        return text
    if Path(path).is_file():
        sys.path.insert(0, str(ROOT))
        from edge.diarization.digests import file_sha256

        return f"{path.name} (sha256 {file_sha256(Path(path))[:12]})"
    return path.name


def emit(result: dict[str, Any], out: Path | None) -> None:
    """Print a benchmark's JSON (and write it to `out` when given), its paths `portable`."""
    text = json.dumps(portable(result), indent=2)
    if out is not None:
        out.write_text(text + "\n")
    print(text)


async def status(http: str) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=30) as c:
        return (await c.get(http + "/ready", headers={"Authorization": f"Token {ADMIN_KEY}"})).json()


async def wait_diarizer(http: str, timeout: float = 300) -> dict[str, Any]:
    """The diarizer's status once it has settled ("ready" or "unavailable")."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        diarizer = (await status(http))["diarizer"]
        if diarizer["state"] in ("ready", "unavailable"):
            return diarizer
        await asyncio.sleep(0.2)
    raise TimeoutError(f"diarizer did not load in {timeout:.0f} s")


__all__ = ["FAKE_ENDPOINT_S", "KEY", "ROOT", "daemon", "daemon_env", "diarizer_settings", "emit",
           "fake_google", "metrics", "portable", "process", "status", "wait_diarizer"]
