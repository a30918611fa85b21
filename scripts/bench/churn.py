#!/usr/bin/env python3
"""Churn: many connect/stream/disconnect cycles against a daemon; afterwards its open file
descriptors, asyncio tasks, threads and RSS must be back to their idle values.

Cycle kinds, in rotation: clean (audio, CloseStream, read to the close), abrupt (audio, then
the TCP connection dropped without a close frame), mid-handshake (a partial HTTP upgrade, then
dropped), refused (wrong key: 401). Starts its own daemon (`python -m edge serve`, no upstream,
no diarizer) unless --url is given. Prints JSON with the command line that made it.

    python scripts/bench/churn.py --cycles 10000 --concurrency 16
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import psutil
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script, too
from scripts.bench.harness import KEY, daemon, emit, metrics

KINDS = ("clean", "abrupt", "handshake", "refused")
AUDIO = b"\x10\x00" * 3200  # 0.2 s of 16 kHz linear16
SETTINGS = {"STT_ENABLE_NEMO_DIARIZATION_FALLBACK": "false", "EDGE_STT_API": "none",
            "EDGE_AUTH_MAX_FAILURES": "100000", "EDGE_MAX_SESSIONS": "256"}


async def sample(pid: int, http: str) -> dict[str, float]:
    """fds/threads/RSS from the OS; tasks and sessions from the daemon's own /metrics."""
    p = psutil.Process(pid)
    m = await metrics(http)
    return {"fds": p.num_fds(), "threads": p.num_threads(), "rss_mb": p.memory_info().rss / 2**20,
            "tasks": m["edge_asyncio_tasks"], "sessions": m["edge_sessions_active"]}


async def settle(pid: int, http: str, seconds: float = 3.0) -> dict[str, float]:
    """Idle values: wait for sessions to end and a main-loop tick to update the gauges."""
    deadline = time.monotonic() + 30
    while True:
        await asyncio.sleep(1.2)  # the gauges update on the 1 s tick
        s = await sample(pid, http)
        if s["sessions"] == 0 or time.monotonic() > deadline:
            break
    await asyncio.sleep(seconds)
    return await sample(pid, http)


async def cycle(ws_base: str, kind: str) -> None:
    url = ws_base + "/v1/listen"
    headers = {"Authorization": f"Token {KEY}"}
    if kind == "clean":
        async with connect(url, additional_headers=headers) as ws:
            await ws.send(AUDIO)
            await ws.send(b"")
            try:
                while True:
                    await ws.recv()
            except ConnectionClosed:
                pass
    elif kind == "abrupt":
        ws = await connect(url, additional_headers=headers)
        await ws.send(AUDIO)
        ws.transport.abort()
    elif kind == "handshake":
        host, port = ws_base.removeprefix("ws://").split(":")
        _reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /v1/listen HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
        await writer.drain()
        writer.transport.abort()
    else:
        try:
            async with connect(url, additional_headers={"Authorization": "Token wrong"}):
                pass
        except InvalidStatus:
            pass


async def churn(ws_base: str, cycles: int, concurrency: int) -> dict[str, int]:
    counts = dict.fromkeys(KINDS, 0)
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        kind = KINDS[i % len(KINDS)]
        async with sem:
            await cycle(ws_base, kind)
        counts[kind] += 1

    await asyncio.gather(*(one(i) for i in range(cycles)))
    return counts


async def run(cycles: int, concurrency: int) -> dict[str, Any]:
    with daemon(**SETTINGS) as (pid, http, ws_base):
        await churn(ws_base, min(200, cycles), concurrency)  # warm-up: allocator, caches
        before = await settle(pid, http)
        start = time.monotonic()
        counts = await churn(ws_base, cycles, concurrency)
        elapsed = time.monotonic() - start
        after = await settle(pid, http)
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "cycles": counts,
        "seconds": round(elapsed, 1),
        "cycles_per_s": round(cycles / elapsed, 1),
        "idle_before": before,
        "idle_after": after,
        "delta": {k: round(after[k] - before[k], 2) for k in before},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cycles", type=int, default=10000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    emit(asyncio.run(run(args.cycles, args.concurrency)), args.out)


if __name__ == "__main__":
    main()
