"""The worker as seen from the event loop: spawn, framed send/receive, stop, kill.

The worker is started with `asyncio.create_subprocess_exec(sys.executable, "-m",
"edge.diarization.worker")`: a fresh interpreter (exec, never a fork of the daemon, so it
inherits no threads, sockets or loop state; `close_fds` keeps the listening socket out of it),
whose stdin/stdout pipes the loop reads and writes without blocking (asyncio's pipe
transports), and whose exit the loop learns at once: the stdout pipe reaches end of file when
the process dies, however it dies. This gives what multiprocessing's spawn would, minus its
pickled handoff of pipe ends and its helper thread.

Writes never block: the transport buffers, and the engine bounds what it sends (per-session
credit), so the buffer stays small.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from edge.diarization import wire
from edge.diarization.wire import Kind

_ROOT = str(Path(__file__).resolve().parents[2])  # the directory holding the `edge` package


class WorkerProcess:
    """One running worker. Create with `await WorkerProcess.spawn()`."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self._proc = proc

    @classmethod
    async def spawn(cls, env: dict[str, str] | None = None) -> WorkerProcess:
        """Start `python -m edge.diarization.worker`. Raises `OSError` if it cannot start."""
        env = dict(os.environ if env is None else env)
        # The worker must import this same `edge`, installed or from a checkout.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_ROOT, env.get("PYTHONPATH")]))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "edge.diarization.worker", str(os.getpid()),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env,
        )
        return cls(proc)

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    def send(self, kind: Kind, meta: dict[str, Any] | None = None, array: np.ndarray | None = None) -> bool:
        """Queue one frame for the worker (never blocks). Returns False if the pipe is closed."""
        stdin = self._proc.stdin
        if stdin is None or stdin.is_closing() or self._proc.returncode is not None:
            return False
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            stdin.write(wire.encode(kind, meta, array))
            return True
        return False

    def write_buffer_size(self) -> int:
        stdin = self._proc.stdin
        return 0 if stdin is None else stdin.transport.get_write_buffer_size()

    async def recv(self) -> wire.Message | None:
        """The next frame from the worker; None once it has exited (end of file).

        Raises `wire.WireError` on a malformed frame or end of file inside one.
        """
        assert self._proc.stdout is not None
        try:
            prefix = await self._proc.stdout.readexactly(4)
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                raise wire.WireError("end of stream inside a frame") from None
            return None
        size = wire.frame_length(prefix)
        try:
            payload = await self._proc.stdout.readexactly(size)
        except asyncio.IncompleteReadError:
            raise wire.WireError("end of stream inside a frame") from None
        return wire.decode(payload)

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


__all__ = ["WorkerProcess"]
