"""sd_notify against a real AF_UNIX datagram socket, with the daemon as a child process."""

from __future__ import annotations

import itertools
import signal
import socket
import time
from pathlib import Path

import httpx

from tests.helpers.daemon import daemon_process


def _collect(sock: socket.socket, until: float) -> list[tuple[float, str]]:
    out = []
    while time.monotonic() < until:
        sock.settimeout(max(0.01, until - time.monotonic()))
        try:
            out.append((time.monotonic(), sock.recv(4096).decode()))
        except TimeoutError:
            break
    return out


def test_the_daemon_notifies_ready_status_watchdog_and_stopping(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    try:
        # WATCHDOG_USEC=1 s: pings every 0.5 s.
        with daemon_process(NOTIFY_SOCKET=str(path), WATCHDOG_USEC="1000000") as (proc, _port):
            msgs = _collect(sock, time.monotonic() + 3.2)
            texts = [m for _, m in msgs]
            assert texts and texts[0].startswith("READY=1\nSTATUS=ready")
            pings = [t for t, m in msgs if m == "WATCHDOG=1"]
            assert len(pings) >= 4
            gaps = [b - a for a, b in itertools.pairwise(pings)]
            assert max(gaps) < 0.9 and min(gaps) > 0.3  # half the interval, with slack
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0
            tail = [m for _, m in _collect(sock, time.monotonic() + 0.5)]
            assert any(m.startswith("STOPPING=1") for m in tail)
    finally:
        sock.close()


def test_missing_notify_socket_does_not_stop_the_daemon(tmp_path: Path) -> None:
    with daemon_process(NOTIFY_SOCKET=str(tmp_path / "absent.sock")) as (proc, _port):
        time.sleep(0.5)
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0


def test_a_manager_that_does_not_read_never_stalls_the_loop(tmp_path: Path) -> None:
    """Pings every 50 ms into a socket nobody reads: its queue fills after ~10 datagrams.
    A blocking sd_notify would freeze the daemon there; ours drops and carries on."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    try:
        with daemon_process(NOTIFY_SOCKET=str(path), WATCHDOG_USEC="100000") as (proc, port):
            time.sleep(1.5)  # ~30 pings: the queue is long full
            for _ in range(5):
                start = time.monotonic()
                assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
                assert time.monotonic() - start < 1.0
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0
    finally:
        sock.close()
