"""Slow and hostile clients: each gets its documented answer; neighbours are unaffected."""

from __future__ import annotations

import asyncio
import json
import time

from websockets.asyncio.client import connect

from tests.helpers.daemon import AUTH, daemon_process, running_app, with_fake_google
from tests.helpers.listen import listen_url, read_until_closed, second_session_unharmed


async def test_client_that_stops_reading_is_dropped_1008() -> None:
    async with running_app() as app:
        async def bad(ws) -> None:  # type: ignore[no-untyped-def]
            # Every garbage frame earns an Error message; never reading them fills the
            # socket buffers, then the bounded outbound queue: the session must be dropped.
            ws.transport.pause_reading()
            for _ in range(60000):
                if ws.close_code is not None or app.listen.sessions.keys().__len__() < 2:
                    break
                await ws.send("garbage")
            deadline = time.monotonic() + 20
            while len(app.listen.sessions) > 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert len(app.listen.sessions) == 1
            assert app.metrics.render().decode().count('edge_queue_dropped_total{queue="outbound"}') == 1
            ws.transport.resume_reading()
            await read_until_closed(ws, timeout=15)
            assert ws.close_code == 1008 and ws.close_reason == "client not reading"
        await second_session_unharmed(app, bad)


async def test_trickled_handshake_is_cut_off() -> None:
    async with running_app(edge_handshake_timeout_s=0.5) as app:
        reader, writer = await asyncio.open_connection("127.0.0.1", app.server.port)
        start = time.monotonic()
        try:
            for line in (b"GET /v1/listen HTTP/1.1\r\n", b"Host: x\r\n", b"Upgrade: websocket\r\n"):
                writer.write(line)
                await writer.drain()
                await asyncio.sleep(0.3)
            data = await asyncio.wait_for(reader.read(), 5)  # EOF: the server hung up
        finally:
            writer.close()
        assert time.monotonic() - start < 3
        assert data == b"" or data.startswith(b"HTTP/1.1")
        # The daemon still serves others.
        async with connect(listen_url(app), additional_headers=AUTH) as ws:
            await ws.send(json.dumps({"type": "CloseStream"}))
            messages = await read_until_closed(ws)
        assert messages[-1]["type"] == "Metadata"


async def _finalize_round_trip(ws) -> float:  # type: ignore[no-untyped-def]
    """Seconds from a Finalize to its from_finalize Results (no upstream: answered at once)."""
    start = time.perf_counter()
    await ws.send(json.dumps({"type": "Finalize"}))
    while True:
        msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if msg.get("type") == "Results" and msg.get("from_finalize"):
            return time.perf_counter() - start


async def test_one_sample_frames_are_cut_off_and_a_neighbour_keeps_its_latency() -> None:
    async with running_app(edge_max_frames_per_s=200) as app:
        async with connect(listen_url(app), additional_headers=AUTH) as good:
            quiet = sorted([await _finalize_round_trip(good) for _ in range(5)])
            async with connect(listen_url(app), additional_headers=AUTH) as bad:
                async def flood() -> None:
                    for _ in range(20000):
                        if bad.close_code is not None:
                            return
                        await bad.send(b"\x01\x00")  # one sample per frame

                flooding = asyncio.create_task(flood())
                loud = sorted([await _finalize_round_trip(good) for _ in range(5)])
                messages = await read_until_closed(bad, timeout=10)
                flooding.cancel()
                await asyncio.gather(flooding, return_exceptions=True)
            assert bad.close_code == 1008 and bad.close_reason == "too many frames"
            assert [m["variant"] for m in messages if m["type"] == "Error"] == ["TOO_MANY_FRAMES"]
            # The neighbour still answers within a small bound (its median, not one sample).
            assert loud[2] < max(0.1, 5 * quiet[2]), (quiet, loud)
            await good.send(json.dumps({"type": "CloseStream"}))
            assert (await read_until_closed(good))[-1]["type"] == "Metadata"
        assert app.monitor.last_lag < 0.25


async def test_a_finalize_flood_is_rate_limited_with_an_error() -> None:
    async with running_app() as app, connect(listen_url(app), additional_headers=AUTH) as ws:
        for _ in range(200):
            await ws.send(json.dumps({"type": "Finalize"}))
        await ws.send(json.dumps({"type": "CloseStream"}))
        messages = await read_until_closed(ws)
    answered = [m for m in messages if m["type"] == "Results" and m["from_finalize"]]
    limited = [m for m in messages if m.get("variant") == "FINALIZE_RATE_LIMITED"]
    assert 10 <= len(answered) < 20 and len(answered) + len(limited) == 200
    assert messages[-1]["type"] == "Metadata"


async def test_deeply_nested_json_gets_an_error_and_the_stream_goes_on(app) -> None:  # type: ignore[no-untyped-def]
    async def bad(ws) -> None:  # type: ignore[no-untyped-def]
        for text in ("[" * 100000, "{" * 3000):
            await ws.send(text)
            msg = json.loads(await asyncio.wait_for(ws.recv(), 5))
            assert msg["type"] == "Error" and msg["variant"] == "INVALID_MESSAGE"
        await ws.send(json.dumps({"type": "CloseStream"}))
        messages = await read_until_closed(ws)
        assert messages[-1]["type"] == "Metadata" and ws.close_code == 1000
    await second_session_unharmed(app, bad)


async def test_half_open_connections_cannot_use_up_file_descriptors() -> None:
    # 400 connections that never send a request, against a daemon allowed 256 descriptors
    # and a long handshake timeout (an attacker that trickles keeps them that long): a real
    # session must still be served. (scripts/bench/churn.py --half-open 2000 does the same
    # at full size.)
    with daemon_process(fd_limit=256, EDGE_STT_API="none",
                        STT_ENABLE_NEMO_DIARIZATION_FALLBACK="false",
                        EDGE_HANDSHAKE_TIMEOUT_S="120", EDGE_MAX_PENDING_CONNECTIONS="64") as (
                            proc, port):
        held = []
        try:
            for _ in range(400):
                held.append(await asyncio.open_connection("127.0.0.1", port))
            await asyncio.sleep(0.5)
            url = f"ws://127.0.0.1:{port}/v1/listen"
            start = time.monotonic()
            async with connect(url, additional_headers=AUTH, open_timeout=5) as ws:
                await ws.send(b"\x00\x00" * 1600)
                await ws.send(json.dumps({"type": "CloseStream"}))
                messages = await read_until_closed(ws)
            assert messages[-1]["type"] == "Metadata"
            assert time.monotonic() - start < 5
            assert proc.poll() is None
        finally:
            for _, writer in held:
                writer.transport.abort()


async def test_one_sample_frames_lose_no_audio_on_the_way_to_google() -> None:
    # The audio queue to the upstream is bounded in blocks (10 s of >= 20 ms blocks): tiny
    # frames must be held together before it, or a burst of them overflows it in milliseconds.
    from tests.fakes.google_speech import encode, utterances

    audio, script = encode(utterances(1))
    async with with_fake_google(edge_max_frames_per_s=100000) as app, connect(
                listen_url(app, "diarize=false"), additional_headers=AUTH) as ws:
        for i in range(0, len(audio), 2):
            await ws.send(audio[i:i + 2])
        await ws.send(json.dumps({"type": "CloseStream"}))
        messages = await read_until_closed(ws, timeout=30)
    assert not [m for m in messages if m["type"] == "Error"], messages
    words = [w["word"] for m in messages if m["type"] == "Results" and m["is_final"]
             for w in m["channel"]["alternatives"][0]["words"]]
    assert words == [w.text for w in script]
    assert messages[-1]["type"] == "Metadata"
