"""The client `Session`'s life (`SessionState`), seen through a real websocket client."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from edge.app import App
from edge.session import InvalidSessionTransition, SessionState
from tests.conftest import KEY


async def test_a_session_receives_then_closes_and_runs_only_once(app: App) -> None:
    url = f"ws://127.0.0.1:{app.server.port}/v1/listen"
    async with connect(url, additional_headers={"Authorization": f"Token {KEY}"}) as ws:
        await ws.send((np.zeros(3200) + 100).astype("<i2").tobytes())
        while not app.listen.sessions:
            await asyncio.sleep(0.01)
        (session,) = app.listen.sessions.values()
        assert session.state is SessionState.RECEIVING
        await ws.send(json.dumps({"type": "CloseStream"}))
        with pytest.raises(ConnectionClosed):
            while True:
                await asyncio.wait_for(ws.recv(), 10)
    assert ws.close_code == 1000
    for _ in range(100):
        if session.state is SessionState.CLOSED:
            break
        await asyncio.sleep(0.01)
    assert session.state is SessionState.CLOSED
    session.end("idle")  # too late to ask: nothing changes
    with pytest.raises(InvalidSessionTransition) as err:
        await session.run()
    assert (err.value.state, err.value.to) == (SessionState.CLOSED, SessionState.RECEIVING)
