"""Property tests: whatever a device or an operator sends, the answer is a documented one.

Parsers (no sockets): every query string either parses or raises QueryError naming a
parameter; every text frame is a known control or a ControlError; every settings value
loads or fails with one line. The live server: random handshakes get only documented HTTP
answers (never a 500), random frames never take down the session or a neighbour.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from urllib.parse import quote, urlencode

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from edge.protocol import (
    ENCODINGS,
    ControlError,
    QueryError,
    parse_control,
    parse_listen_query,
)
from edge.settings import Settings, SettingsError, load_settings
from tests.helpers.daemon import KEY, running_app

PARAMS = ["encoding", "sample_rate", "channels", "language", "model", "diarize",
          "interim_results", "punctuate", "smart_format", "vad_events", "utterance_end_ms",
          "endpointing", "speaker_turns", "keywords", "tag"]
values = st.one_of(
    st.text(max_size=20),
    st.integers(-10**6, 10**6).map(str),
    st.sampled_from(["true", "false", "linear16", "mulaw", "alaw", "opus", "16000", "auto",
                     "en-US", "nova-3", "chirp_3", ""]),
)
queries = st.lists(st.tuples(st.sampled_from(PARAMS) | st.text(max_size=8), values), max_size=8)


@given(queries)
def test_query_parses_or_names_the_parameter(pairs: list[tuple[str, str]]) -> None:
    query = urlencode(pairs)
    try:
        params = parse_listen_query(query)
    except QueryError as exc:
        assert exc.name in PARAMS
        assert str(exc).startswith(exc.name + "=")
        return
    assert 8000 <= params.sample_rate <= 48000
    assert params.encoding is None or params.encoding in ENCODINGS
    assert 1 <= params.channels <= 32


@given(st.one_of(
    st.text(max_size=60),
    st.builds(lambda t: json.dumps({"type": t}), st.text(max_size=20) | st.integers()),
    st.sampled_from(['{"type":"KeepAlive"}', '{"type":"Finalize"}', '{"type":"CloseStream"}']),
))
def test_text_frames_are_controls_or_control_errors(text: str) -> None:
    try:
        assert parse_control(text) in ("KeepAlive", "Finalize", "CloseStream", "Configure")
    except ControlError as exc:
        assert str(exc)


FIELDS = sorted(name.upper() for name in Settings.model_fields)


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(FIELDS), value=values.filter(lambda v: "\x00" not in v))
def test_any_setting_value_loads_or_fails_with_one_line(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    with monkeypatch.context() as m:
        m.setenv(name, value)
        try:
            load_settings()
        except SettingsError as exc:
            line = str(exc)
            assert "\n" not in line and line.split("=")[0].split(" ")[0].isupper()
        except OSError:
            pytest.fail(f"{name}={value!r} raised OSError instead of a SettingsError")


def test_settings_fuzz_through_the_real_cli() -> None:
    """A handful of hostile values through `edge serve` itself: exit 2, one line, no traceback."""
    env = dict(os.environ, EDGE_PORT="99999999", EDGE_ENV_FILE="/dev/null")
    proc = subprocess.run(["python", "-m", "edge", "serve"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("edge: invalid setting EDGE_PORT='99999999'")


DOCUMENTED_HTTP = {400, 401, 404, 405, 426, 429, 503}


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/v1/listen", "/v1/status", "/ready", "/metrics", "/x"]),
       query=queries, auth=st.sampled_from([None, f"Token {KEY}", "Token x", "Bearer", "💥"]))
def test_live_handshakes_get_documented_answers(path: str, query: list, auth: str | None) -> None:
    async def attempt() -> None:
        async with running_app(edge_auth_max_failures=100000) as app:
            url = f"ws://127.0.0.1:{app.server.port}{path}?{urlencode(query, quote_via=quote)}"
            headers = {"Authorization": auth} if auth is not None else None
            try:
                async with connect(url, additional_headers=headers, open_timeout=5) as ws:
                    assert path in ("/v1/listen", "/v1/status")
                    if path == "/v1/status":
                        assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "Status"
                        return
                    await ws.send(b"")
                    with pytest.raises(ConnectionClosed):
                        while True:
                            await asyncio.wait_for(ws.recv(), 5)
                    assert ws.close_code == 1000
            except InvalidStatus as exc:
                status = exc.response.status_code
                assert status in DOCUMENTED_HTTP or (status == 200 and path in ("/ready", "/metrics"))
                if status not in (200, 426):  # refusals carry Deepgram's error shape
                    assert "err_code" in json.loads(exc.response.body)
            except InvalidHandshake:
                pass  # e.g. a 200 probe answered to a websocket client
    asyncio.run(attempt())


frames = st.lists(
    st.one_of(
        st.binary(max_size=3000),
        st.text(max_size=50),
        st.sampled_from(['{"type":"KeepAlive"}', '{"type":"Finalize"}']),
    ),
    max_size=12,
)


@settings(max_examples=25, deadline=None)
@given(encoding=st.sampled_from(["linear16", "linear32", "mulaw", "alaw"]),
       rate=st.sampled_from([8000, 11025, 16000, 44100, 48000]), sent=frames)
def test_random_frames_never_break_the_session_or_a_neighbour(
    encoding: str, rate: int, sent: list[bytes | str]
) -> None:
    async def attempt() -> None:
        async with running_app(edge_max_frame_bytes=2048) as app:
            base = f"ws://127.0.0.1:{app.server.port}/v1/listen"
            auth = {"Authorization": f"Token {KEY}"}
            query = f"?encoding={encoding}&sample_rate={rate}"
            async with connect(base, additional_headers=auth) as neighbour, \
                    connect(base + query, additional_headers=auth, max_size=None) as ws:
                for frame in sent:
                    try:
                        await ws.send(frame)
                    except ConnectionClosed:
                        break
                try:
                    await ws.send(b"")
                    while True:
                        msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
                        assert msg["type"] in ("Results", "Error", "Metadata")
                except ConnectionClosed:
                    pass
                assert ws.close_code in (1000, 1008, 1009)
                await neighbour.send(b"\x00\x01" * 800)
                await neighbour.send(b"")
                last = None
                with pytest.raises(ConnectionClosed):
                    while True:
                        last = json.loads(await asyncio.wait_for(neighbour.recv(), 10))
                assert neighbour.close_code == 1000 and last and last["type"] == "Metadata"
    asyncio.run(attempt())
