"""/v1/listen with real clients: handshake answers, controls and the bad-input table.

These run without an upstream or diarizer (the session still owes the client its Metadata
and close codes); test_session_e2e.py covers transcripts and speaker labels.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from edge.app import App
from tests.helpers.daemon import AUTH, KEY, running_app
from tests.helpers.listen import listen_url, pcm, read_until_closed, second_session_unharmed


async def test_close_stream_sends_metadata_then_1000(app: App) -> None:
    audio = pcm(1.0)
    async with connect(listen_url(app), additional_headers=AUTH) as ws:
        for i in range(0, len(audio), 3200):
            await ws.send(audio[i:i + 3200])
        await ws.send(json.dumps({"type": "CloseStream"}))
        messages = await read_until_closed(ws)
    assert ws.close_code == 1000
    meta = messages[-1]
    assert meta["type"] == "Metadata"
    assert meta["sha256"] == hashlib.sha256(audio).hexdigest()
    assert meta["duration"] == pytest.approx(1.0)
    assert meta["channels"] == 1 and meta["transaction_key"] == "deprecated"
    assert meta["request_id"]


async def test_empty_binary_frame_means_close_stream(app: App) -> None:
    async with connect(listen_url(app, "encoding=mulaw&sample_rate=8000"),
                       additional_headers=AUTH) as ws:
        await ws.send(b"\xff" * 800)
        await ws.send(b"")
        messages = await read_until_closed(ws)
    assert ws.close_code == 1000 and messages[-1]["type"] == "Metadata"
    assert messages[-1]["duration"] == pytest.approx(0.1)


async def test_finalize_without_upstream_acknowledges(app: App) -> None:
    async with connect(listen_url(app), additional_headers=AUTH) as ws:
        await ws.send(pcm(0.2))
        await ws.send(json.dumps({"type": "Finalize"}))
        msg = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert msg["type"] == "Results" and msg["from_finalize"] is True and msg["is_final"]


BAD_QUERIES = [
    ("sample_rate=abc", "sample_rate"),
    ("sample_rate=4000", "sample_rate"),
    ("sample_rate=96000", "sample_rate"),
    ("encoding=mp3", "encoding"),
    ("encoding=amr-nb&sample_rate=16000", "sample_rate"),
    ("encoding=opus&sample_rate=44100", "sample_rate"),
    ("channels=0", "channels"),
    ("channels=two", "channels"),
    ("multichannel=yes", "multichannel"),
    ("endpointing=soon", "endpointing"),
    ("endpointing=-1", "endpointing"),
    ("diarize=yes", "diarize"),
    ("interim_results=1", "interim_results"),
    ("language=en_US!", "language"),
    ("utterance_end_ms=-10", "utterance_end_ms"),
    ("model=" + "x" * 80, "model"),
]


@pytest.mark.parametrize(("query", "param"), BAD_QUERIES)
async def test_bad_query_is_400_naming_the_parameter(app: App, query: str, param: str) -> None:
    with pytest.raises(InvalidStatus) as err:
        async with connect(listen_url(app, query), additional_headers=AUTH):
            pass
    assert err.value.response.status_code == 400
    body = json.loads(err.value.response.body)
    assert body["err_code"] == "INVALID_QUERY_PARAMETER"
    assert body["err_msg"].startswith(param + "=")


# The handshakes Deepgram's clients make that edge once refused.
STANDARD_HANDSHAKES = [
    "channels=2&multichannel=true",  # Twilio's stereo
    "channels=2",  # downmixed
    "language=multi",
    "endpointing=5",
    "endpointing=0",
    "endpointing=false",
    "endpointing=true",
    "utterance_end_ms=500",
    "utterance_end_ms=1000&interim_results=true&vad_events=true",
]


@pytest.mark.parametrize("query", STANDARD_HANDSHAKES)
async def test_standard_handshakes_are_accepted(app: App, query: str) -> None:
    async with connect(listen_url(app, query), additional_headers=AUTH) as ws:
        await ws.send(b"")
        messages = await read_until_closed(ws)
    assert ws.close_code == 1000 and messages[-1]["type"] == "Metadata"


@pytest.mark.parametrize("scheme", ["token", "bearer"])
async def test_browser_subprotocols_authenticate(app: App, scheme: str) -> None:
    async with connect(listen_url(app), subprotocols=[scheme, KEY]) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == scheme
        await ws.send(b"")
        messages = await read_until_closed(ws)
    assert messages[-1]["type"] == "Metadata"
    with pytest.raises(InvalidStatus) as err:
        async with connect(listen_url(app), subprotocols=[scheme, "wrong"]):  # type: ignore[list-item]
            pass
    assert err.value.response.status_code == 401


async def test_configure_is_answered(app: App) -> None:
    async with connect(listen_url(app), additional_headers=AUTH) as ws:
        await ws.send(json.dumps({"type": "Configure"}))
        ok = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert ok["type"] == "ConfigureSuccess" and ok["request_id"]
        await ws.send(json.dumps({"type": "Configure", "keyterms": ["edge"]}))
        no = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert no["type"] == "ConfigureFailure"
        assert no["code"] == "CONFIGURE_KEYTERMS_NOT_SUPPORTED" and "keyterms" in no["description"]
        await ws.send(json.dumps({"type": "Configure", "features": {"numerals": True}}))
        no = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert no["type"] == "ConfigureFailure" and "numerals" in no["description"]
        await ws.send(b"")
        messages = await read_until_closed(ws)
    assert messages[-1]["type"] == "Metadata"


async def test_unknown_parameters_are_ignored(app: App, caplog: pytest.LogCaptureFixture) -> None:
    query = "foo=bar&keywords=a&keywords=b&smart_format=true&model=nova-3&tag=x"
    with caplog.at_level(logging.WARNING, "edge.session"):
        async with connect(listen_url(app, query), additional_headers=AUTH) as ws:
            await ws.send(b"")
            messages = await read_until_closed(ws)
    assert messages[-1]["type"] == "Metadata"
    warnings = [r.getMessage() for r in caplog.records if "not honoured" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].endswith("foo, keywords, tag")


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Token nope"}])
async def test_wrong_key_is_401_at_handshake(app: App, headers: dict[str, str]) -> None:
    with pytest.raises(InvalidStatus) as err:
        async with connect(listen_url(app), additional_headers=headers):
            pass
    assert err.value.response.status_code == 401


async def test_capacity_is_503_at_handshake() -> None:
    async with running_app(edge_max_sessions=1) as app:
        async with connect(listen_url(app), additional_headers=AUTH) as first:
            await first.send(pcm(0.1))
            await asyncio.sleep(0.1)
            with pytest.raises(InvalidStatus) as err:
                async with connect(listen_url(app), additional_headers=AUTH):
                    pass
            assert err.value.response.status_code == 503
            assert json.loads(err.value.response.body)["err_code"] == "TOO_MANY_SESSIONS"
        # A freed slot admits the next device.
        await asyncio.sleep(0.2)
        async with connect(listen_url(app), additional_headers=AUTH) as ws:
            await ws.send(b"")
            await read_until_closed(ws)


async def test_oversize_frame_closes_1008_others_unaffected() -> None:
    async with running_app(edge_max_frame_bytes=4096) as app:
        async def bad(ws: ClientConnection) -> None:
            await ws.send(b"\x00" * 5000)
            await read_until_closed(ws)
            assert ws.close_code == 1008 and ws.close_reason == "frame too large"
        await second_session_unharmed(app, bad)


async def test_garbage_text_frame_gets_error_and_stream_continues(app: App) -> None:
    async def bad(ws: ClientConnection) -> None:
        for text in ["not json", "[1,2]", '{"type": "Dance"}', '{"type": 5}']:
            await ws.send(text)
            msg = json.loads(await asyncio.wait_for(ws.recv(), 5))
            assert msg["type"] == "Error" and msg["variant"] == "INVALID_MESSAGE"
            assert msg["description"]
        await ws.send(pcm(0.1))
        await ws.send(json.dumps({"type": "CloseStream"}))
        messages = await read_until_closed(ws)
        assert messages[-1]["type"] == "Metadata" and ws.close_code == 1000
    await second_session_unharmed(app, bad)


async def test_odd_length_pcm_is_carried(app: App) -> None:
    audio = pcm(0.5)
    async with connect(listen_url(app), additional_headers=AUTH) as ws:
        for i in range(0, len(audio), 333):  # odd sizes split samples across frames
            await ws.send(audio[i:i + 333])
        await ws.send(b"")
        messages = await read_until_closed(ws)
    assert messages[-1]["duration"] == pytest.approx(0.5)
    assert messages[-1]["sha256"] == hashlib.sha256(audio).hexdigest()


async def test_idle_timeout_closes_1011_net0001() -> None:
    async with running_app(edge_idle_timeout_s=0.6) as app:
        async def bad(ws: ClientConnection) -> None:
            await ws.send(pcm(0.1))
            await read_until_closed(ws, timeout=5)
            assert ws.close_code == 1011 and ws.close_reason == "NET-0001"
        await second_session_unharmed(app, bad)


async def test_keepalive_holds_an_idle_session_open() -> None:
    async with running_app(edge_idle_timeout_s=0.6) as app:
        async with connect(listen_url(app), additional_headers=AUTH) as ws:
            for _ in range(6):
                await ws.send(json.dumps({"type": "KeepAlive"}))
                await asyncio.sleep(0.25)
            await ws.send(b"")
            messages = await read_until_closed(ws)
        assert ws.close_code == 1000 and messages[-1]["type"] == "Metadata"


async def test_client_vanishing_mid_stream_frees_its_slot(app: App) -> None:
    async def bad(ws: ClientConnection) -> None:
        await ws.send(pcm(0.2))
        ws.transport.abort()  # no close frame: the device lost power
        for _ in range(100):
            if len(app.listen.sessions) == 1:
                break
            await asyncio.sleep(0.02)
        assert len(app.listen.sessions) == 1
    await second_session_unharmed(app, bad)
    await asyncio.sleep(0.1)
    assert app.status.sessions["active"] == 0


async def test_shutdown_flushes_and_closes_1001() -> None:
    async with running_app() as app:
        ws = await connect(listen_url(app), additional_headers=AUTH)
        await ws.send(pcm(0.3))
        await asyncio.sleep(0.1)
        app.stop()
        messages = await read_until_closed(ws)
        assert ws.close_code == 1001
        assert messages[-1]["type"] == "Metadata"
        assert messages[-1]["duration"] == pytest.approx(0.3)


async def test_sessions_counted_in_status_and_metrics(app: App) -> None:
    async with connect(listen_url(app), additional_headers=AUTH) as ws:
        await ws.send(pcm(0.1))
        await asyncio.sleep(0.1)
        assert app.status.sessions["active"] == 1
        async with httpx.AsyncClient() as c:
            text = (await c.get(f"http://127.0.0.1:{app.server.port}/metrics", headers=AUTH)).text
        assert "edge_sessions_active 1.0" in text
        await ws.send(b"")
        await read_until_closed(ws)


async def test_the_session_runs_with_the_parameters_its_handshake_was_accepted_with(app: App) -> None:
    query = "encoding=linear16&sample_rate=8000&interim_results=true&foo=1"
    async with connect(listen_url(app, query), additional_headers=AUTH) as ws:
        await ws.send(pcm(0.1, rate=8000))
        for _ in range(100):
            if app.listen.sessions:
                break
            await asyncio.sleep(0.02)
        (session,) = app.listen.sessions.values()
        assert (session.params.encoding, session.params.sample_rate,
                session.params.interim_results, session.params.ignored) == (
            "linear16", 8000, True, ("foo",))
        # Parsed once, at the handshake; handed over, not kept for the connection's life.
        assert not app.listen._accepted
        await ws.send(b"")
        await read_until_closed(ws)
