"""One websockets server on one port: `/v1/listen`, `/v1/status` and the HTTP probes.

Routing happens in `process_request` (websockets' hook before the upgrade): probes are
answered there as plain HTTP, refusals (401, 400, 503) too — never by opening a websocket
and closing it. Websocket paths continue the handshake and land in `_handler`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
from collections.abc import Sequence
from typing import Protocol
from urllib.parse import urlsplit

from websockets.asyncio.server import Server as WsServer
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from edge import protocol
from edge.health import Status
from edge.metrics import Metrics
from edge.settings import Settings

log = logging.getLogger("edge.server")

PATH_LISTEN = "/v1/listen"
PATH_STATUS = "/v1/status"
PROBES = ("/health", "/ready", "/metrics")
WEBSOCKET_PATHS = (PATH_LISTEN, PATH_STATUS)


class ListenService(Protocol):
    """What serves `/v1/listen` (the session manager)."""

    def accept(self, request: Request) -> Response | None:
        """Handshake checks after auth (query, capacity): a refusal, or None to go on."""

    async def handle(self, connection: ServerConnection) -> None:
        """Run one session on an open connection until it ends."""

    async def drain(self, timeout: float) -> None:
        """Flush and close every open session (1001), within `timeout` seconds."""


class Server:
    """Holds the websockets server and routes requests; owns no session state."""

    def __init__(
        self,
        settings: Settings,
        status: Status,
        metrics: Metrics,
        listen: ListenService | None = None,
    ) -> None:
        self.settings = settings
        self.status = status
        self.metrics = metrics
        self.listen = listen
        self._keys = settings.api_keys()
        self._throttle = protocol.AuthThrottle(
            settings.edge_auth_max_failures, settings.edge_auth_window_s
        )
        self._ws: WsServer | None = None
        self._status_clients: set[ServerConnection] = set()

    @property
    def port(self) -> int:
        assert self._ws is not None
        return self._ws.sockets[0].getsockname()[1]

    async def start(self) -> None:
        s = self.settings
        self._ws = await serve(
            self._handler,
            s.edge_host,
            s.edge_port,
            process_request=self._process_request,
            select_subprotocol=_select_subprotocol,
            compression=None,  # PCM barely compresses; deflate would only cost CPU
            # Twice the limit: frames between the two get our documented 1008 from the
            # session; only absurd ones are cut off by websockets itself (1009).
            max_size=2 * s.edge_max_frame_bytes,
            open_timeout=s.edge_handshake_timeout_s,
            ssl=_ssl_context(s),
            server_header="edge",
        )
        log.info("listening on %s:%d", s.edge_host, self.port)

    def stop_accepting(self) -> None:
        """Close the listening socket; open connections carry on."""
        if self._ws is not None:
            self._ws.close(close_connections=False)

    async def shutdown(self, timeout: float) -> None:
        """Drain sessions (they flush, then close 1001), close status channels, and wait for
        every handler to finish; whatever is left after `timeout` is closed 1001 anyway."""
        self.stop_accepting()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if self.listen is not None:
            await self.listen.drain(timeout)
        for conn in list(self._status_clients):
            await conn.close(protocol.CLOSE_GOING_AWAY, protocol.REASON_SHUTDOWN)
        if self._ws is not None:
            remaining = max(0.1, deadline - loop.time())
            try:
                await asyncio.wait_for(self._ws.wait_closed(), remaining)
            except asyncio.TimeoutError:
                log.warning("drain deadline passed: closing remaining connections")
                self._ws.close(code=protocol.CLOSE_GOING_AWAY, reason=protocol.REASON_SHUTDOWN)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._ws.wait_closed(), 2.0)

    # --- routing (before the upgrade) ---
    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        known = path in PROBES or path in WEBSOCKET_PATHS
        if not known:
            return protocol.json_response(404, protocol.error_body("NOT_FOUND", f"no route {path}"))
        if request.method != "GET":
            return protocol.json_response(
                405,
                protocol.error_body("METHOD_NOT_ALLOWED", f"{request.method} not allowed on {path}"),
                headers=[("Allow", "GET")],
            )
        if path == "/health":
            return protocol.json_response(200, {"status": "ok"})
        if self._keys:
            refusal = self._authenticate(connection, request)
            if refusal is not None:
                return refusal
        if path == "/ready":
            return protocol.json_response(200 if self.status.ready else 503, self.status.snapshot())
        if path == "/metrics":
            return protocol.text_response(200, self.metrics.render(), self.metrics.content_type)
        if path == PATH_LISTEN:
            if self.listen is None:
                return protocol.json_response(
                    503, protocol.error_body("UNAVAILABLE", "sessions are not available yet")
                )
            return self.listen.accept(request)
        return None  # /v1/status: continue the websocket handshake

    def _authenticate(self, connection: ServerConnection, request: Request) -> Response | None:
        address = str(connection.remote_address[0]) if connection.remote_address else "?"
        now = time.monotonic()
        if self._throttle.blocked(address, now):
            self.metrics.auth_throttled.inc()
            return protocol.too_many_attempts(self.settings.edge_auth_window_s)
        if protocol.key_matches(protocol.request_token(request.headers), self._keys):
            return None
        self._throttle.failed(address, now)
        self.metrics.auth_failures.inc()
        return protocol.unauthorized()

    async def _handler(self, connection: ServerConnection) -> None:
        path = urlsplit(connection.request.path).path
        if path == PATH_LISTEN and self.listen is not None:
            await self.listen.handle(connection)
        elif path == PATH_STATUS:
            await self._status_channel(connection)

    async def _status_channel(self, connection: ServerConnection) -> None:
        """Snapshot on connect, then one per change, and a heartbeat when nothing changes."""
        self._status_clients.add(connection)
        closed = asyncio.ensure_future(connection.wait_closed())
        try:
            generation = self.status.generation
            await connection.send(json.dumps(self.status.snapshot()))
            while not closed.done():
                changed = asyncio.ensure_future(
                    self.status.wait_changed(generation, self.settings.edge_status_heartbeat_s)
                )
                await asyncio.wait({changed, closed}, return_when=asyncio.FIRST_COMPLETED)
                if closed.done():
                    changed.cancel()
                    break
                generation = changed.result()
                await connection.send(json.dumps(self.status.snapshot()))
        except ConnectionClosed:
            pass
        finally:
            closed.cancel()
            self._status_clients.discard(connection)


def _select_subprotocol(connection: ServerConnection, offered: Sequence[str]) -> str | None:
    # Browsers authenticate with subprotocols ["token"|"bearer", key]; echo the scheme.
    return protocol.auth_subprotocol(offered)


def _ssl_context(settings: Settings) -> ssl.SSLContext | None:
    if settings.edge_tls_cert is None or settings.edge_tls_key is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(settings.edge_tls_cert, settings.edge_tls_key)
    return ctx


__all__ = ["ListenService", "Server"]
