"""systemd glue: sd_notify, the watchdog interval, and logging to journald or stderr.

sd_notify is one datagram to `NOTIFY_SOCKET`; the daemon sends it itself on a NON-BLOCKING
socket. libsystemd's `sd_notify` (what systemd-python calls) uses a blocking socket: when the
manager's datagram queue is full (10 by default, e.g. PID 1 busy at boot) it blocks the
caller — here, the event loop and every session with it (measured: tests/test_systemd.py).
A notification the manager cannot take right now is dropped and logged once; the next tick
sends a fresh one. A `NOTIFY_SOCKET` that names a missing path is logged once too: a notify
failure must never stop the daemon. systemd-python is still used for journald.
"""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import os
import queue
import socket
import sys
from pathlib import Path

log = logging.getLogger("edge.systemd")


class Notifier:
    """Sends sd_notify messages when the daemon runs under systemd (`NOTIFY_SOCKET` set)."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.socket = env.get("NOTIFY_SOCKET")
        self.watchdog_interval = _watchdog_interval(env)
        self.dropped = 0
        self._warned: set[str] = set()
        self._sock: socket.socket | None = None
        if self.socket:
            # A leading "@" names a socket in the abstract namespace.
            self._address = "\0" + self.socket[1:] if self.socket.startswith("@") else self.socket

    @property
    def enabled(self) -> bool:
        return bool(self.socket)

    def notify(self, message: str) -> bool:
        """Send one notification; True if the manager took it. Never blocks, never raises."""
        if not self.socket:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(message.encode(), self._address)
            return True
        except BlockingIOError:
            self.dropped += 1
            self._warn_once("busy", "service manager busy: sd_notify message dropped (not waiting)")
        except OSError as exc:
            self._warn_once(type(exc).__name__, f"sd_notify to {self.socket} failed: {exc}")
        return False

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)

    def ready(self, status: str) -> bool:
        return self.notify(f"READY=1\nSTATUS={status}")

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str = "draining sessions") -> bool:
        return self.notify(f"STOPPING=1\nSTATUS={status}")


def _watchdog_interval(env: dict[str, str] | os._Environ[str]) -> float | None:
    """Seconds between pings (half of `WATCHDOG_USEC`), or None when no watchdog is asked.

    `WATCHDOG_PID`, when set, must be ours: a child started with the variable inherited must
    not ping for its parent.
    """
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec:
        return None
    if pid and pid != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not an integer", usec)
        return None
    return value / 2 / 1_000_000 if value > 0 else None


class DroppingQueueHandler(logging.handlers.QueueHandler):
    """Hands records to the log thread; when its bounded queue is full the record is dropped
    and counted, because a stalled log sink (a full pipe, a slow journald) must never stall
    the event loop."""

    def __init__(self, q: queue.Queue[logging.LogRecord]) -> None:
        super().__init__(q)
        self.dropped = 0

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1


LOG_QUEUE_MAX = 10000
_listener: logging.handlers.QueueListener | None = None


def setup_logging(level: str) -> None:
    """journald when started by systemd (`JOURNAL_STREAM` set) and importable, else stderr.

    Records go through a bounded queue to a writer thread (overflow: drop and count).
    """
    global _listener
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(level)
    handler: logging.Handler
    use_journal = bool(os.environ.get("JOURNAL_STREAM")) or (Path(
        "/run/systemd/journal/socket"
    ).exists() and bool(os.environ.get("INVOCATION_ID")))
    try:
        if not use_journal:
            raise ImportError
        from systemd.journal import JournalHandler

        handler = JournalHandler(SYSLOG_IDENTIFIER="edge")
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    except ImportError:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
    if _listener is not None:
        _listener.stop()
    q: queue.Queue[logging.LogRecord] = queue.Queue(LOG_QUEUE_MAX)
    _listener = logging.handlers.QueueListener(q, handler, respect_handler_level=False)
    _listener.start()
    atexit.register(_listener.stop)
    root.addHandler(DroppingQueueHandler(q))
    # websockets logs every refused handshake at INFO; ours are counted in /metrics instead.
    logging.getLogger("websockets").setLevel(max(logging.WARNING, root.level))


__all__ = ["Notifier", "setup_logging"]
