#!/usr/bin/env python3
"""Churn: many connect/stream/disconnect cycles against a daemon; afterwards its open file
descriptors, asyncio tasks, threads and RSS must be back to their idle values.

Cycle kinds, in rotation: clean (audio, CloseStream, read to the close), abrupt (audio, then
the TCP connection dropped without a close frame), mid-handshake (a partial HTTP upgrade, then
dropped), refused (wrong key: 401). Starts its own daemon (`python -m edge serve`, no upstream,
no diarizer). Prints JSON with the command line that made it.

    python scripts/bench/churn.py --cycles 10000 --concurrency 16

`--hostile` runs the hostile-client comparison instead, each part side by side with its bound
switched off (a limit too high to matter), against daemons with the fake Google service:
- tiny frames: normal devices (20 ms frames of silence in real time, a Finalize every 0.6 s,
  timed to its `from_finalize` answer: the neighbour latency) alone, then next to a client
  sending 2-byte (1-sample) frames as fast as it can, reconnecting whenever it is cut off;
  the daemon's loop lag p99 (`edge_event_loop_lag_p99_seconds`) for each phase;
- half-open: `--half-open N` TCP connections that never send a request, held, against a daemon
  with RLIMIT_NOFILE 1024 (a unit without LimitNOFILE=), then one real session: served or not,
  and how long it took.

    python scripts/bench/churn.py --hostile --seconds 10 --half-open 2000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import psutil
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script, too
from scripts.bench.harness import KEY, daemon, emit, fake_google, metrics
from scripts.bench.server import pct

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


# --- hostile clients ---------------------------------------------------------------------
FRAME = b"\x00\x00" * 320  # 20 ms of silence
NEIGHBOURS = 4
FINALIZE_EVERY_S = 0.6  # under the daemon's Finalize rate limit (2/s)
HEADERS = {"Authorization": f"Token {KEY}"}


async def neighbour(ws_base: str, seconds: float, rtts: list[float]) -> None:
    """A normal device: 20 ms frames in real time; each Finalize timed to its answer."""
    async with connect(ws_base + "/v1/listen", additional_headers=HEADERS) as ws:
        asked: list[float] = []

        async def answers() -> None:
            async for raw in ws:
                msg = json.loads(raw)
                if msg.get("type") == "Results" and msg.get("from_finalize") and asked:
                    rtts.append(time.perf_counter() - asked.pop(0))

        reader = asyncio.create_task(answers())
        loop = asyncio.get_running_loop()
        start = next_finalize = loop.time()
        frames = 0
        while loop.time() - start < seconds:
            await ws.send(FRAME)
            frames += 1
            if loop.time() >= next_finalize:
                asked.append(time.perf_counter())
                await ws.send(json.dumps({"type": "Finalize"}))
                next_finalize += FINALIZE_EVERY_S
            await asyncio.sleep(max(0.0, start + frames * 0.02 - loop.time()))
        await ws.send(json.dumps({"type": "CloseStream"}))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(reader, 15)
        reader.cancel()


async def tiny_frames(ws_base: str, seconds: float) -> dict[str, Any]:
    """2-byte frames as fast as the socket takes them, reconnecting whenever cut off."""
    sent = sessions = cut = 0
    loop = asyncio.get_running_loop()
    start = loop.time()
    end = start + seconds
    first_cut: float | None = None
    while loop.time() < end:
        sessions += 1
        try:
            async with connect(ws_base + "/v1/listen", additional_headers=HEADERS) as ws:
                while loop.time() < end:
                    for _ in range(200):
                        await ws.send(b"\x01\x00")
                    sent += 200
                    await asyncio.sleep(0)
        except (ConnectionClosed, InvalidStatus, OSError):
            cut += 1
            first_cut = first_cut if first_cut is not None else round(loop.time() - start, 3)
            await asyncio.sleep(0.05)
    return {"frames_sent": sent, "sessions": sessions, "sessions_cut": cut,
            "first_cut_after_s": first_cut}


async def phase(ws_base: str, http: str, seconds: float, hostile: bool) -> dict[str, Any]:
    rtts: list[float] = []
    jobs = [neighbour(ws_base, seconds, rtts) for _ in range(NEIGHBOURS)]
    attack = asyncio.create_task(tiny_frames(ws_base, seconds)) if hostile else None
    await asyncio.gather(*jobs)
    out: dict[str, Any] = {
        "neighbour_finalize_rtt_p50_s": pct(rtts, 0.5),
        "neighbour_finalize_rtt_p99_s": pct(rtts, 0.99),
        "neighbour_answers": len(rtts),
        "loop_lag_p99_s": (await metrics(http))["edge_event_loop_lag_p99_seconds"],
    }
    if attack is not None:
        out["tiny_frame_client"] = await attack
    await asyncio.sleep(11)  # let the 10 s lag window forget this phase
    return out


async def tiny_frame_comparison(seconds: float) -> dict[str, Any]:
    out = {}
    with fake_google() as endpoint:
        for name, limit in (("bounded", None), ("unbounded", "100000")):
            settings = {**SETTINGS, "EDGE_STT_API": "v2", "EDGE_STT_ENDPOINT": endpoint,
                        "EDGE_STT_INSECURE": "true"}
            if limit is not None:
                settings["EDGE_MAX_FRAMES_PER_S"] = limit
            with daemon(**settings) as (_pid, http, ws_base):
                await asyncio.sleep(11)  # start-up out of the lag window
                out[name] = {
                    "max_frames_per_s": int(limit or 500),
                    "alone": await phase(ws_base, http, seconds, hostile=False),
                    "with_tiny_frames": await phase(ws_base, http, seconds, hostile=True),
                }
    return out


async def half_open(count: int) -> dict[str, Any]:
    out = {}
    for name, cap in (("capped", None), ("uncapped", "100000")):
        settings = {**SETTINGS, "EDGE_HANDSHAKE_TIMEOUT_S": "120"}
        if cap is not None:
            settings["EDGE_MAX_PENDING_CONNECTIONS"] = cap
        with daemon(fd_limit=1024, **settings) as (pid, _http, ws_base):
            host, port = ws_base.removeprefix("ws://").split(":")
            held = []
            for _ in range(count):
                try:
                    held.append(await asyncio.open_connection(host, int(port)))
                except OSError:
                    break
            await asyncio.sleep(1.0)
            fds = psutil.Process(pid).num_fds()
            start = time.monotonic()
            served, error = False, None
            try:
                async with connect(ws_base + "/v1/listen", additional_headers=HEADERS,
                                   open_timeout=10) as ws:
                    await ws.send(AUDIO)
                    await ws.send(json.dumps({"type": "CloseStream"}))
                    async for raw in ws:
                        served = served or json.loads(raw).get("type") == "Metadata"
            except Exception as exc:  # what a device would see: any failure to be served
                error = f"{type(exc).__name__}: {exc}"
            out[name] = {
                "max_pending_connections": int(cap or 256), "half_open_held": len(held),
                "daemon_fds": fds, "real_session_served": served,
                "real_session_s": round(time.monotonic() - start, 3), "error": error,
            }
            for _, writer in held:
                writer.transport.abort()
    return out


async def hostile(seconds: float, half_open_count: int) -> dict[str, Any]:
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "neighbours": NEIGHBOURS,
        "seconds_per_phase": seconds,
        "tiny_frames": await tiny_frame_comparison(seconds),
        "half_open": await half_open(half_open_count),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cycles", type=int, default=10000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--hostile", action="store_true", help="the hostile-client comparison")
    ap.add_argument("--seconds", type=float, default=10.0, help="--hostile: seconds per phase")
    ap.add_argument("--half-open", type=int, default=2000, help="--hostile: connections held")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.hostile:
        emit(asyncio.run(hostile(args.seconds, args.half_open)), args.out)
    else:
        emit(asyncio.run(run(args.cycles, args.concurrency)), args.out)


if __name__ == "__main__":
    main()
