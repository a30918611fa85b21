"""The client session (edge/session.py) on its own: a real websocket server whose handler runs
one `Session` with the fake Google service as its upstream (no App, no diarizer), and a real
client. What is checked is what `run()` returns and what the client receives: how each end
(close, shutdown, idle, a vanished client, bad frames, a flood) flushes or drops what it owes,
Finalize, and an upstream that fails."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import wave
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from edge import protocol
from edge.health import Status
from edge.metrics import Metrics
from edge.session import End, Session, SessionDeps
from edge.settings import load_settings
from edge.stt.google import create_upstream
from edge.stt.policy import Backoff
from tests.fakes.google_speech import FakeSpeech, ScriptWord, encode, fake_speech, utterances
from tests.helpers.daemon import SR, final_words
from tests.helpers.listen import read_until_closed

pytestmark = pytest.mark.timeout(120)
CHUNK = 3200  # 100 ms of 16 kHz linear16


@dataclass
class Served:
    """One server running sessions, what its handler saw, and the fake Google behind it."""

    port: int
    fake: FakeSpeech
    metrics: Metrics
    sessions: asyncio.Queue[Session] = field(default_factory=asyncio.Queue)
    ends: asyncio.Queue[End] = field(default_factory=asyncio.Queue)

    def url(self, query: str = "encoding=linear16&sample_rate=16000&diarize=false") -> str:
        return f"ws://127.0.0.1:{self.port}/v1/listen?{query}"

    async def ended(self) -> End:
        """What the next session's `run()` returned."""
        return await asyncio.wait_for(self.ends.get(), 30)


@contextlib.asynccontextmanager
async def sessions(**overrides: Any) -> AsyncIterator[Served]:
    """Serve `Session`s with the fake Google as upstream; settings as field names."""
    async with fake_speech() as (fake, endpoint):
        settings = load_settings(edge_stt_endpoint=endpoint, edge_stt_insecure=True,
                                 stt_enable_nemo_diarization_fallback=False, **overrides)
        status, metrics = Status(max_sessions=4), Metrics()
        upstream = await create_upstream(settings, status, metrics,
                                          backoff=Backoff(initial=0.01, maximum=0.05))
        assert upstream is not None, status.checks
        deps = SessionDeps(settings, status, metrics, upstream, engine=None)
        served: Served | None = None

        async def handler(conn: ServerConnection) -> None:
            assert served is not None and conn.request is not None
            params = protocol.parse_listen_query(urlsplit(conn.request.path).query)
            session = Session(conn, params, deps, "req-1")
            served.sessions.put_nowait(session)
            served.ends.put_nowait(await session.run())

        try:
            async with serve(handler, "127.0.0.1", 0) as server:
                port = next(iter(server.sockets)).getsockname()[1]
                served = Served(port, fake, metrics)
                yield served
        finally:
            await upstream.close()


async def send_audio(ws: ClientConnection, audio: bytes) -> None:
    for i in range(0, len(audio), CHUNK):
        await ws.send(audio[i:i + CHUNK])


async def read_until(ws: ClientConnection, want: Any, timeout: float = 20) -> list[dict[str, Any]]:
    """Messages up to and including the first for which `want(message)` holds."""
    messages: list[dict[str, Any]] = []
    while not messages or not want(messages[-1]):
        messages.append(json.loads(await asyncio.wait_for(ws.recv(), timeout)))
    return messages


def texts(words: list[dict[str, Any]]) -> list[str]:
    return [w["word"] for w in words]


def scripted(script: list[ScriptWord]) -> list[str]:
    return [s.text for s in script]


def errors(messages: list[dict[str, Any]], variant: str) -> list[dict[str, Any]]:
    return [m for m in messages if m["type"] == "Error" and m["variant"] == variant]


async def test_close_stream_flushes_every_final_then_metadata_and_closes_1000() -> None:
    audio, script = encode(utterances(2, words=3))
    async with sessions() as served, connect(served.url()) as ws:
        await send_audio(ws, audio)
        await ws.send(json.dumps({"type": "CloseStream"}))
        messages = await read_until_closed(ws, timeout=20)
        assert await served.ended() == "close"
    assert (ws.close_code, ws.close_reason) == (1000, "")
    assert texts(final_words(messages)) == scripted(script)
    meta = messages[-1]
    assert meta["type"] == "Metadata" and meta["request_id"] == "req-1"
    assert meta["sha256"] == hashlib.sha256(audio).hexdigest()
    assert meta["duration"] == pytest.approx(len(audio) / 2 / SR, abs=0.01)
    assert served.fake.calls and served.fake.calls[-1].outcome == "ok"


async def test_shutdown_flushes_the_finals_owed_and_metadata_then_closes_1001() -> None:
    audio, script = encode(utterances(2, words=3))
    async with sessions() as served, connect(served.url()) as ws:
        await send_audio(ws, audio)
        session = await served.sessions.get()
        # Everything sent has been heard by the session before it is told to go.
        while session.deps.metrics.audio_seconds._value.get() < len(audio) / 2 / SR - 0.01:
            await asyncio.sleep(0.01)
        session.end("shutdown")
        messages = await read_until_closed(ws, timeout=20)
        assert await served.ended() == "shutdown"
    assert (ws.close_code, ws.close_reason) == (1001, protocol.REASON_SHUTDOWN)
    assert texts(final_words(messages)) == scripted(script)  # no CloseStream, nothing lost
    assert messages[-1]["type"] == "Metadata"
    assert messages[-1]["sha256"] == hashlib.sha256(audio).hexdigest()


async def test_idle_end_closes_1011_without_metadata_and_the_first_reason_wins() -> None:
    audio, _ = encode(utterances(1, words=2))
    async with sessions() as served, connect(served.url()) as ws:
        await send_audio(ws, audio)
        session = await served.sessions.get()
        session.end("idle")
        session.end("shutdown")  # a second reason changes nothing
        messages = await read_until_closed(ws, timeout=20)
        assert await served.ended() == "idle"
    assert (ws.close_code, ws.close_reason) == (1011, protocol.REASON_IDLE)
    assert "Metadata" not in {m["type"] for m in messages}


async def test_a_client_that_vanishes_ends_gone_and_its_google_call_is_released() -> None:
    audio, _ = encode(utterances(1, words=2))
    async with sessions() as served:
        async with connect(served.url()) as ws:
            await send_audio(ws, audio)
            while not served.fake.calls:  # the session's Google call is open
                await asyncio.sleep(0.01)
            ws.transport.abort()  # no close frame, no CloseStream
        assert await served.ended() == "gone"
        for _ in range(200):
            if served.fake.calls[-1].outcome != "open":
                break
            await asyncio.sleep(0.05)
        assert served.fake.calls[-1].outcome == "cancelled"


async def test_a_bad_text_frame_gets_an_error_and_the_session_goes_on() -> None:
    audio, script = encode(utterances(1, words=3))
    async with sessions() as served, connect(served.url()) as ws:
        await ws.send("not json")
        await ws.send(json.dumps({"type": "Dance"}))
        first = [json.loads(await asyncio.wait_for(ws.recv(), 5)) for _ in range(2)]
        assert [m["variant"] for m in first] == ["INVALID_MESSAGE"] * 2
        assert "Dance" in first[1]["description"]
        await send_audio(ws, audio)
        await ws.send(json.dumps({"type": "CloseStream"}))
        messages = await read_until_closed(ws, timeout=20)
        assert await served.ended() == "close"
    assert texts(final_words(messages)) == scripted(script)
    assert messages[-1]["type"] == "Metadata"


async def test_configure_is_answered_and_changes_nothing() -> None:
    async with sessions() as served, connect(served.url()) as ws:
        await ws.send(json.dumps({"type": "Configure", "features": {"punctuate": True}}))
        reply = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert reply["type"] == "ConfigureFailure" and "punctuate" in json.dumps(reply)
        await ws.send(json.dumps({"type": "CloseStream"}))
        assert (await read_until_closed(ws, timeout=20))[-1]["type"] == "Metadata"
        assert await served.ended() == "close"


async def test_an_oversize_frame_ends_too_large_with_1008_and_no_metadata() -> None:
    async with sessions(edge_max_frame_bytes=4096) as served, connect(served.url()) as ws:
        await ws.send(b"\0" * 4096)  # at the bound: audio
        await ws.send(b"\0" * 4097)
        messages = await read_until_closed(ws, timeout=20)
        assert await served.ended() == "too_large"
    assert (ws.close_code, ws.close_reason) == (1008, protocol.REASON_FRAME_TOO_LARGE)
    assert "Metadata" not in {m["type"] for m in messages}


async def test_too_many_frames_end_too_fast_with_an_error_saying_the_bound() -> None:
    async with sessions(edge_max_frames_per_s=10) as served, connect(served.url()) as ws:
        with contextlib.suppress(ConnectionClosed):
            for _ in range(100):  # the bucket holds one second's burst: 10 frames
                await ws.send(b"\0" * 320)
        messages = await read_until_closed(ws, timeout=20)
        assert await served.ended() == "too_fast"
    assert (ws.close_code, ws.close_reason) == (1008, protocol.REASON_TOO_MANY_FRAMES)
    [error] = errors(messages, "TOO_MANY_FRAMES")
    assert "10 audio frames per second" in error["description"]


async def test_audio_that_ends_inside_its_header_ends_bad_audio_with_data_0000() -> None:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SR)
        w.writeframes(b"\0" * 3200)
    async with sessions() as served, connect(served.url("diarize=false")) as ws:
        await ws.send(buf.getvalue()[:30])  # no encoding given: the first bytes say WAV
        await ws.send(json.dumps({"type": "CloseStream"}))
        messages = await read_until_closed(ws, timeout=20)
        assert await served.ended() == "bad_audio"
    assert (ws.close_code, ws.close_reason) == (1008, protocol.REASON_BAD_AUDIO)
    [error] = errors(messages, protocol.REASON_BAD_AUDIO)
    assert "header" in error["description"]


async def test_finalize_answers_with_from_finalize_finals_for_the_audio_so_far() -> None:
    first, script1 = encode(utterances(1, words=3))
    async with sessions() as served, connect(served.url()) as ws:
        await send_audio(ws, first)
        await ws.send(json.dumps({"type": "Finalize"}))
        got = await read_until(ws, lambda m: m["type"] == "Results" and m.get("from_finalize"))
        assert texts(final_words(got)) == scripted(script1)
        await ws.send(json.dumps({"type": "CloseStream"}))
        rest = await read_until_closed(ws, timeout=20)
        assert await served.ended() == "close"
    assert rest[-1]["type"] == "Metadata"


async def test_a_finalize_flood_is_refused_with_an_error_and_loses_no_words() -> None:
    audio, script = encode(utterances(2, words=2))
    async with sessions() as served, connect(served.url()) as ws:
        await send_audio(ws, audio)
        for _ in range(30):
            await ws.send(json.dumps({"type": "Finalize"}))
        await ws.send(json.dumps({"type": "CloseStream"}))
        messages = await read_until_closed(ws, timeout=30)
        assert await served.ended() == "close"
    # Bursts of 10, then 2 per second: how many more pass depends on how fast 30 were sent.
    refused = errors(messages, "FINALIZE_RATE_LIMITED")
    assert 0 < len(refused) <= 20
    assert texts(final_words(messages)) == scripted(script)
    assert messages[-1]["type"] == "Metadata"


async def test_an_upstream_that_refuses_the_config_is_reported_and_the_session_still_closes_1000() -> None:
    audio, _ = encode(utterances(1, words=2))
    async with sessions(edge_stt_model="chirp_3") as served:
        served.fake.faults.invalid_models = {"chirp_3"}
        async with connect(served.url()) as ws:
            await send_audio(ws, audio)
            await ws.send(json.dumps({"type": "CloseStream"}))
            messages = await read_until_closed(ws, timeout=20)
            assert await served.ended() == "close"
    assert (ws.close_code, ws.close_reason) == (1000, "")
    [error] = errors(messages, "UPSTREAM_ERROR")
    assert "chirp_3" in error["description"]
    assert final_words(messages) == []
    assert messages[-1]["type"] == "Metadata"
    assert messages[-1]["sha256"] == hashlib.sha256(audio).hexdigest()  # the audio was all taken
