"""Slow and hostile clients: each gets its documented answer; neighbours are unaffected."""

from __future__ import annotations

import asyncio
import json
import time

from websockets.asyncio.client import connect

from tests.conftest import KEY, running_app
from tests.test_listen import _healthy_second_session, listen_url, read_until_closed

AUTH = {"Authorization": f"Token {KEY}"}


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
        await _healthy_second_session(app, bad)


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
