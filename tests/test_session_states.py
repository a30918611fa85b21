"""The client `Session`'s life (`SessionState`), seen through a real websocket client."""

from __future__ import annotations

import asyncio
import json

import pytest
from websockets.asyncio.client import connect

from edge.app import App
from edge.session import InvalidSessionTransition, SessionState
from tests.helpers.daemon import KEY
from tests.helpers.listen import listen_url, pcm, read_until_closed


async def test_a_session_receives_then_closes_and_runs_only_once(app: App) -> None:
    async with connect(listen_url(app), additional_headers={"Authorization": f"Token {KEY}"}) as ws:
        await ws.send(pcm(0.1))
        while not app.listen.sessions:
            await asyncio.sleep(0.01)
        (session,) = app.listen.sessions.values()
        assert session.state is SessionState.RECEIVING
        await ws.send(json.dumps({"type": "CloseStream"}))
        await read_until_closed(ws)
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
