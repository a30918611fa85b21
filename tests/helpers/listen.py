"""Clients of /v1/listen for tests: URLs, test tones, reading a session to its close, and a
second session that must not be harmed by what one client does."""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from edge.app import App
from tests.helpers.daemon import AUTH


def listen_url(app: App, query: str = "") -> str:
    """The /v1/listen URL of a running `app`, with `query` if given."""
    return f"ws://127.0.0.1:{app.server.port}/v1/listen" + (f"?{query}" if query else "")


def pcm(seconds: float, rate: int = 16000) -> bytes:
    """`seconds` of a 220 Hz tone as 16-bit little-endian PCM at `rate`."""
    t = np.arange(int(seconds * rate)) / rate
    return (np.sin(2 * np.pi * 220 * t) * 8000).astype("<i2").tobytes()


async def read_until_closed(ws: ClientConnection, timeout: float = 10) -> list[dict[str, Any]]:
    """Every JSON message `ws` receives until the server closes it (`timeout` per message)."""
    messages = []
    with pytest.raises(ConnectionClosed):
        while True:
            messages.append(json.loads(await asyncio.wait_for(ws.recv(), timeout)))
    return messages


async def second_session_unharmed(app: App, bad: Any) -> None:
    """Run `bad(ws)` on one session while a second streams; the second must be unharmed."""
    audio = pcm(1.0)
    async with (
        connect(listen_url(app), additional_headers=AUTH) as good,
        connect(listen_url(app), additional_headers=AUTH) as victim,
    ):
        for i in range(0, 16000, 3200):
            await good.send(audio[i:i + 3200])

        async def keep_alive() -> None:
            while True:
                await good.send(json.dumps({"type": "KeepAlive"}))
                await asyncio.sleep(0.2)

        alive = asyncio.create_task(keep_alive())
        try:
            await bad(victim)
        finally:
            alive.cancel()
        for i in range(16000, len(audio), 3200):
            await good.send(audio[i:i + 3200])
        await good.send(json.dumps({"type": "CloseStream"}))
        messages = await read_until_closed(good)
    assert good.close_code == 1000
    assert messages[-1]["type"] == "Metadata"
    assert messages[-1]["sha256"] == hashlib.sha256(audio).hexdigest()
