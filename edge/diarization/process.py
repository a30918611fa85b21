"""The worker as seen from the event loop: spawn, framed send/receive, stop, kill.

The worker is started with `asyncio.create_subprocess_exec(sys.executable, "-I", "-c", BOOT)`:
a fresh interpreter (exec, never a fork of the daemon, so it inherits no threads, sockets or
loop state; `close_fds` keeps the listening socket out of it),
whose stdin/stdout pipes the loop reads and writes without blocking (asyncio's pipe
transports), and whose exit the loop learns at once: the stdout pipe reaches end of file when
the process dies, however it dies. This gives what multiprocessing's spawn would, minus its
pickled handoff of pipe ends and its helper thread.

What it inherits is kept small (issue 14, items 11 and 16):
- `-I` (isolated mode): neither the working directory nor PYTHONPATH/PYTHONHOME/user site go on
  `sys.path`. BOOT puts the directory holding *this* `edge` package first, so the worker runs
  the same code as the daemon, installed or an editable checkout, then absolute PYTHONPATH
  entries (a Jetson image may put NVIDIA's torch there). Its cwd is `/`.
- A minimal environment (`worker_env`): what the interpreter, torch/NeMo/ONNX Runtime, CUDA and
  a model download read; no API keys, no Google credentials, no EDGE_ settings (those come in
  the LOAD message, minus the daemon's secrets).
- BOOT sets its own `oom_score_adj` to 1000 before importing anything heavy, so when the unit's
  memory runs out the kernel kills the worker, which the supervisor restarts, not the daemon.

Writes never block: the transport buffers, and the engine bounds what it sends (per-session
credit), so the buffer stays small.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edge.diarization import wire
from edge.diarization.wire import Kind

_ROOT = str(Path(__file__).resolve().parents[2])  # the directory holding the `edge` package
WORKER_CWD = "/"
OOM_SCORE_ADJ = 1000  # the kernel's first choice when memory runs out (its maximum)

# Runs in the new interpreter before anything else: argv[1] is our directory, argv[2] the
# daemon's pid. Writing oom_score_adj upwards needs no privilege; where /proc is not there,
# the worker runs without it. `{entry}` is the module whose `main(argv) -> int` runs.
_BOOT = f"""\
import os, sys
try:
    with open('/proc/self/oom_score_adj', 'w') as f:
        f.write('{OOM_SCORE_ADJ}')
except OSError:
    pass
root = sys.argv.pop(1)
extra = [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if os.path.isabs(p)]
sys.path[:0] = [root] + [p for p in extra if p != root]
from {{entry}} import main
sys.exit(main())
"""
WORKER_ENTRY = "edge.diarization.worker.main"
BOOT = _BOOT.format(entry=WORKER_ENTRY)

# What the worker may inherit (item 16): exact names, and prefixes.
_ENV_NAMES = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "PYTHONPATH",
    "PYTHONUNBUFFERED", "LD_LIBRARY_PATH", "LD_PRELOAD", "SSL_CERT_FILE", "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY",
    "http_proxy", "https_proxy", "no_proxy", "JOURNAL_STREAM", "COVERAGE_PROCESS_START",
})
_ENV_PREFIXES = (
    "LC_", "XDG_", "HF_", "HUGGINGFACE_", "NEMO_", "TORCH_", "PYTORCH_", "CUDA_", "NVIDIA_",
    "CUDNN_", "TRT_", "ORT_", "OMP_", "MKL_", "KMP_", "OPENBLAS_", "NUMBA_", "NUMEXPR_",
    "GOMP_", "TOKENIZERS_", "MALLOC_", "EDGE_DIARIZATION_",
)


def worker_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The subset of `environ` the worker gets: see `_ENV_NAMES` and `_ENV_PREFIXES`.

    EDGE_DIARIZATION_* passes (the worker's own settings; none is a secret), nothing else
    of the daemon's EDGE_/STT_ settings, API keys or Google credentials does."""
    return {k: v for k, v in environ.items() if k in _ENV_NAMES or k.startswith(_ENV_PREFIXES)}


async def receive(reader: asyncio.StreamReader) -> wire.Message | None:
    """The next frame on `reader` (either side of a pipe); None at end of file between frames.

    Raises `wire.WireError` on a malformed frame or end of file inside one.
    """
    try:
        prefix = await reader.readexactly(4)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise wire.WireError("end of stream inside a frame") from None
        return None
    size = wire.frame_length(prefix)
    try:
        payload = await reader.readexactly(size)
    except asyncio.IncompleteReadError:
        raise wire.WireError("end of stream inside a frame") from None
    return wire.decode(payload)


class WorkerProcess:
    """One running worker. Create with `await WorkerProcess.spawn()`."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self._proc = proc

    @classmethod
    async def spawn(cls, env: dict[str, str] | None = None,
                    entry: str = WORKER_ENTRY) -> WorkerProcess:
        """Start the worker (isolated, in `/`, with `worker_env(env or os.environ)`); `entry`
        names the module whose `main()` it runs (the decoder process gives its own).

        Raises `OSError` if it cannot start (EMFILE, ENOMEM, EAGAIN...): the supervisor retries.
        """
        boot = _BOOT.format(entry=entry)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-I", "-c", boot, _ROOT, str(os.getpid()),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            env=worker_env(os.environ if env is None else env), cwd=WORKER_CWD,
        )
        return cls(proc)

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    def send(self, kind: Kind, meta: dict[str, Any] | None = None, array: np.ndarray | None = None,
             data: bytes | None = None) -> bool:
        """Queue one frame for the worker (never blocks). Returns False if the pipe is closed."""
        return self.write(wire.encode(kind, meta, array, data))

    def write(self, frames: bytes) -> bool:
        """Queue encoded frames (`wire.encode`) for the worker (never blocks). Returns False
        if the pipe is closed."""
        stdin = self._proc.stdin
        if stdin is None or stdin.is_closing() or self._proc.returncode is not None:
            return False
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            stdin.write(frames)
            return True
        return False

    async def recv(self) -> wire.Message | None:
        """The next frame from the worker; None once it has exited (end of file).

        Raises `wire.WireError` on a malformed frame or end of file inside one.
        """
        assert self._proc.stdout is not None
        return await receive(self._proc.stdout)

    def kill(self) -> None:
        """SIGKILL (a hung step cannot be interrupted any other way)."""
        with contextlib.suppress(ProcessLookupError):
            self._proc.kill()

    async def wait(self) -> int:
        return await self._proc.wait()

    async def stop(self, grace: float = 5.0) -> int:
        """Ask the worker to exit (SHUTDOWN, then end of input); kill it after `grace` s."""
        self.send(Kind.SHUTDOWN)
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            return await asyncio.wait_for(self._proc.wait(), grace)
        except asyncio.TimeoutError:
            self.kill()
            return await self._proc.wait()


__all__ = ["BOOT", "OOM_SCORE_ADJ", "WORKER_CWD", "WORKER_ENTRY", "WorkerProcess", "receive",
           "worker_env"]
