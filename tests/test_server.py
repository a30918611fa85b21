"""The server with real clients: HTTP probes (httpx) and the status channel (websockets)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from edge.app import App
from edge.server import STATUS_CLOSE_S
from tests.helpers.daemon import AUTH, KEY, running_app


def base(app: App) -> str:
    return f"http://127.0.0.1:{app.server.port}"


async def test_health_needs_no_key(app: App) -> None:
    async with httpx.AsyncClient() as c:
        r = await c.get(base(app) + "/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


@pytest.mark.parametrize("path", ["/ready", "/metrics"])
@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Token wrong"}, {"Authorization": "Basic " + KEY}, {"Authorization": "Token"}],
)
async def test_probes_refuse_without_valid_key(app: App, path: str, headers: dict[str, str]) -> None:
    async with httpx.AsyncClient() as c:
        r = await c.get(base(app) + path, headers=headers)
    assert r.status_code == 401
    assert r.json()["err_code"] == "INVALID_AUTH"
    assert KEY not in r.text


async def test_ready_serves_the_status_object(app: App) -> None:
    async with httpx.AsyncClient() as c:
        r = await c.get(base(app) + "/ready", headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200
        body = r.json()
        assert body["ready"] is True
        assert body["checks"]["config"] == "ok" and body["checks"]["packages"] == "ok"
        # No operator keys configured: an API key gets the summary (no reasons).
        assert body["checks"]["upstream"] == "unconfigured" and body["detail"] == "summary"
        assert body["sessions"] == {"active": 0, "max": 16}
        # A failed required check makes the daemon unready; optional ones never do.
        app.status.set_check("nemo", "NeMo not available: test")
        assert (await c.get(base(app) + "/ready", headers=AUTH)).status_code == 200
        app.status.set_check("packages", "missing: soxr")
        r = await c.get(base(app) + "/ready", headers=AUTH)
        assert r.status_code == 503 and r.json()["checks"]["packages"] == "missing"


async def test_metrics_is_prometheus_text(app: App) -> None:
    async with httpx.AsyncClient() as c:
        await c.get(base(app) + "/ready")  # one auth failure to count
        r = await c.get(base(app) + "/metrics", headers=AUTH)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    assert "edge_auth_failures_total 1.0" in r.text
    assert "edge_event_loop_lag_seconds_bucket" in r.text
    assert "process_resident_memory_bytes" in r.text


async def test_an_unknown_path_is_404_and_a_wrong_method_405(app: App) -> None:
    async with httpx.AsyncClient() as c:
        r = await c.get(base(app) + "/nope", headers=AUTH)
        assert r.status_code == 404 and r.json()["err_code"] == "NOT_FOUND"
        r = await c.post(base(app) + "/ready", headers=AUTH)
        assert r.status_code == 405 and r.headers["allow"] == "GET"


async def test_status_channel_refuses_without_key(app: App) -> None:
    with pytest.raises(InvalidStatus) as err:
        async with connect(f"ws://127.0.0.1:{app.server.port}/v1/status"):
            pass
    assert err.value.response.status_code == 401
    assert json.loads(err.value.response.body)["err_code"] == "INVALID_AUTH"


async def test_status_channel_sends_a_snapshot_pushes_changes_and_heartbeats() -> None:
    async with running_app(edge_status_heartbeat_s=0.3) as app:
        url = f"ws://127.0.0.1:{app.server.port}/v1/status"
        async with connect(url, additional_headers=AUTH) as ws:
            first = json.loads(await asyncio.wait_for(ws.recv(), 5))
            assert first["type"] == "Status" and first["ready"] is True
            app.status.set_check("upstream", "ok")
            pushed = json.loads(await asyncio.wait_for(ws.recv(), 5))
            assert pushed["checks"]["upstream"] == "ok"
            # Nothing changes: a heartbeat still arrives within the interval.
            beat = json.loads(await asyncio.wait_for(ws.recv(), 2))
            assert beat["checks"] == pushed["checks"]
            assert beat["uptime_s"] > pushed["uptime_s"]


async def test_status_channel_authenticates_by_browser_subprotocol(app: App) -> None:
    url = f"ws://127.0.0.1:{app.server.port}/v1/status"
    async with connect(url, subprotocols=["token", KEY]) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == "token"
        assert json.loads(await ws.recv())["type"] == "Status"


async def test_shutdown_closes_status_channel_1001() -> None:
    async with running_app() as app:
        url = f"ws://127.0.0.1:{app.server.port}/v1/status"
        ws = await connect(url, additional_headers=AUTH)
        await ws.recv()
        app.stop()
        await asyncio.wait_for(ws.wait_closed(), 10)
        assert ws.close_code == 1001


async def test_unauthenticated_loopback_when_no_keys() -> None:
    async with running_app(edge_api_keys=None) as app, httpx.AsyncClient() as c:
        assert (await c.get(base(app) + "/ready")).status_code == 200


async def test_auth_brute_force_is_throttled_per_address() -> None:
    async with running_app(edge_auth_max_failures=3, edge_auth_window_s=30) as app:
        async with httpx.AsyncClient() as c:
            codes = [
                (await c.get(base(app) + "/ready", headers={"Authorization": f"Token guess{i}"}))
                .status_code for i in range(5)
            ]
            assert codes == [401, 401, 401, 429, 429]
            # Even the right key is refused while the address is throttled.
            r = await c.get(base(app) + "/ready", headers=AUTH)
            assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
            assert (await c.get(base(app) + "/health")).status_code == 200
        text = app.metrics.render().decode()
        assert "edge_auth_failures_total 3.0" in text
        assert "edge_auth_throttled_total 3.0" in text


async def test_a_path_that_is_not_a_url_gets_400_and_no_traceback(
        app: App, caplog: pytest.LogCaptureFixture) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", app.server.port)
    try:
        writer.write(b"GET //[ HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        head = await asyncio.wait_for(reader.read(4096), 5)
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 400 "), head
    assert b"BAD_REQUEST" in head
    assert not [r for r in caplog.records if r.exc_info or r.levelname == "ERROR"]


async def test_status_clients_are_capped() -> None:
    async with running_app(edge_max_status_clients=2) as app:
        url = f"ws://127.0.0.1:{app.server.port}/v1/status"
        async with connect(url, additional_headers=AUTH), connect(url, additional_headers=AUTH):
            with pytest.raises(InvalidStatus) as err:
                async with connect(url, additional_headers=AUTH):
                    pass
            assert err.value.response.status_code == 503
            assert json.loads(err.value.response.body)["err_code"] == "TOO_MANY_STATUS_CLIENTS"
        # Closed ones free their place.
        await asyncio.sleep(0.1)
        async with connect(url, additional_headers=AUTH) as ws:
            assert json.loads(await ws.recv())["type"] == "Status"


@pytest.mark.parametrize(("frame", "code"), [("hello", 1008), (b"\x00", 1008), ("x" * 5000, 1009)])
async def test_status_channel_closes_on_any_data_frame(app: App, frame: str | bytes,
                                                       code: int) -> None:
    url = f"ws://127.0.0.1:{app.server.port}/v1/status"
    async with connect(url, additional_headers=AUTH) as ws:
        await ws.recv()
        await ws.send(frame)
        await asyncio.wait_for(ws.wait_closed(), 5)
    assert ws.close_code == code
    for _ in range(100):  # the handler lets go of it right after the close
        if not app.server._status_clients:
            break
        await asyncio.sleep(0.01)
    assert not app.server._status_clients


async def test_shutdown_does_not_wait_on_status_clients_that_stopped_reading() -> None:
    async with running_app() as app:
        url = f"ws://127.0.0.1:{app.server.port}/v1/status"
        clients = [await connect(url, additional_headers=AUTH) for _ in range(3)]
        for ws in clients:
            await ws.recv()
            ws.transport.pause_reading()  # never sees (or answers) the server's close frame
        start = asyncio.get_running_loop().time()
        app.stop()
    elapsed = asyncio.get_running_loop().time() - start
    assert elapsed < 2 * STATUS_CLOSE_S + 1, f"shutdown took {elapsed:.1f} s"
    for ws in clients:
        ws.transport.abort()


ADMIN = "admin-key-0123456789"


async def test_only_operator_keys_see_other_sessions_paths_and_errors() -> None:
    async with running_app(edge_admin_keys=ADMIN) as app, httpx.AsyncClient() as c:
        app.status.notice("upstream", "session 5f0c-secret-id: 12.0 s of audio not transcribed")
        app.status.update_diarizer(state="unavailable", model="/var/cache/edge/secret.nemo",
                                   reason="cannot read /var/cache/edge/secret.nemo")
        app.status.set_check("upstream", "error: PermissionDenied: project 4242 is not allowed")
        secrets = ("5f0c-secret-id", "/var/cache/edge/secret.nemo", "project 4242")
        url = f"ws://127.0.0.1:{app.server.port}/v1/status"
        for headers, detailed in ((AUTH, False), ({"Authorization": f"Token {ADMIN}"}, True)):
            ready = (await c.get(base(app) + "/ready", headers=headers)).text
            async with connect(url, additional_headers=headers) as ws:
                pushed = await ws.recv()
            for text in (ready, pushed):
                assert all((s in text) == detailed for s in secrets), (detailed, text)
                body = json.loads(text)
                assert body["ready"] is True and body["diarizer"]["state"] == "unavailable"
                assert body["checks"]["upstream"].startswith("error")
        # Probes stay as they were: /health needs no key, /ready answers any valid key.
        assert (await c.get(base(app) + "/health")).status_code == 200
        metrics = (await c.get(base(app) + "/metrics", headers=AUTH)).text
        assert not any(s in metrics for s in secrets)


async def test_failed_keys_are_logged_with_the_address_rate_limited_never_the_key(
        caplog: pytest.LogCaptureFixture) -> None:
    async with running_app(edge_auth_max_failures=1000) as app, httpx.AsyncClient() as c:
        caplog.clear()
        for i in range(40):
            await c.get(base(app) + "/ready", headers={"Authorization": f"Token guess-{i}-xyz"})
    lines = [r.getMessage() for r in caplog.records if r.name == "edge.server"
             and "refused" in r.getMessage()]
    assert 1 <= len(lines) <= 12, lines
    assert all("127.0.0.1" in line and "wrong key" in line for line in lines)
    assert not any("-xyz" in r.getMessage() for r in caplog.records)


async def test_keys_over_plaintext_beyond_loopback_are_warned_about(
        caplog: pytest.LogCaptureFixture) -> None:
    async with running_app(edge_host="0.0.0.0"):
        pass
    assert any("plain text" in r.getMessage() for r in caplog.records
               if r.levelname == "WARNING"), [r.getMessage() for r in caplog.records]
    caplog.clear()
    async with running_app():
        pass
    assert not any("plain text" in r.getMessage() for r in caplog.records)
