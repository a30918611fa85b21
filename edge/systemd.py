"""systemd glue: sd_notify, the watchdog interval, and logging to journald or stderr.

Uses systemd-python where importable. Without it (a device where the C extension could not
be built) the same datagram goes out over a plain AF_UNIX socket — the sd_notify protocol is
one datagram, so this fallback is exact; it is said once in the log. A `NOTIFY_SOCKET` that
names a missing path raises: we log that once and carry on, since a notify failure must
never stop the daemon.
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

try:
    from systemd import daemon as _sd_daemon
except ImportError:  # pragma: no cover - depends on the machine
    _sd_daemon = None


class Notifier:
    """Sends sd_notify messages when the daemon runs under systemd (`NOTIFY_SOCKET` set)."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.socket = env.get("NOTIFY_SOCKET")
        self._failed_once = False
        self.watchdog_interval = _watchdog_interval(env)
        if _sd_daemon is None:
            log.info("systemd-python not installed: sd_notify over a plain socket")

    @property
    def enabled(self) -> bool:
        return bool(self.socket)

    def notify(self, message: str) -> bool:
        if not self.socket:
            return False
        try:
            if _sd_daemon is not None:
                return bool(_sd_daemon.notify(message))
            return _send_datagram(self.socket, message)
        except OSError as exc:
            if not self._failed_once:
                log.warning("sd_notify to %s failed: %s", self.socket, exc)
                self._failed_once = True
            return False

    def ready(self, status: str) -> bool:
        return self.notify(f"READY=1\nSTATUS={status}")

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str = "draining sessions") -> bool:
        return self.notify(f"STOPPING=1\nSTATUS={status}")

    def extend_timeout(self, seconds: float) -> bool:
        return self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")


def _send_datagram(path: str, message: str) -> bool:
    # A leading "@" names a socket in the abstract namespace.
    address = "\0" + path[1:] if path.startswith("@") else path
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.sendto(message.encode(), address)
    return True


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
