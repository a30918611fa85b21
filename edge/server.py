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
from typing import Any, Protocol
from urllib.parse import urlsplit

from websockets.asyncio.server import Server as WsServer
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from edge import protocol
from edge.health import Status
from edge.limits import AuthThrottle, PendingCap, TokenBucket, throttle_key
from edge.metrics import Metrics
from edge.settings import Settings, is_loopback

log = logging.getLogger("edge.server")

PATH_LISTEN = "/v1/listen"
PATH_STATUS = "/v1/status"
PROBES = ("/health", "/ready", "/metrics")
WEBSOCKET_PATHS = (PATH_LISTEN, PATH_STATUS)
# Status clients only listen: anything they send is refused, so keep what one may send tiny
# (websockets' own limit on /v1/listen is twice EDGE_MAX_FRAME_BYTES).
STATUS_MAX_INBOUND = 1024
STATUS_CLOSE_S = 2.0  # shutdown: status clients get this long to answer the close, then abort
AUTH_LOG_PER_S, AUTH_LOG_BURST = 1.0, 10  # failed-key warnings; the rest are counted


class ListenService(Protocol):
    """What serves `/v1/listen` (the session manager)."""

    def accept(self, connection: ServerConnection, request: Request) -> Response | None:
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
        self._admin_keys = settings.admin_keys()
        self._keys = settings.api_keys() + self._admin_keys
        # Failed-key log lines: a guesser must not be able to flood the journal.
        self._auth_log = TokenBucket(AUTH_LOG_PER_S, AUTH_LOG_BURST, time.monotonic())
        self._auth_log_suppressed = 0
        self._throttle = AuthThrottle(
            settings.edge_auth_max_failures, settings.edge_auth_window_s
        )
        self._ws: WsServer | None = None
        self._status_clients: set[ServerConnection] = set()
        self._pending = PendingCap(settings.edge_max_pending_connections,
                                   on_evict=metrics.pending_evicted.inc)

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
            create_connection=self._connection,  # type: ignore[arg-type]
        )
        log.info("listening on %s:%d", s.edge_host, self.port)
        if self._keys and s.edge_tls_cert is None and not is_loopback(s.edge_host):
            log.warning("API keys travel in plain text: listening on %s without TLS (ws://); "
                        "set EDGE_TLS_CERT and EDGE_TLS_KEY, or bind to loopback behind a "
                        "TLS proxy", s.edge_host)

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
        await self._close_status_clients()
        if self._ws is not None:
            remaining = max(0.1, deadline - loop.time())
            try:
                await asyncio.wait_for(self._ws.wait_closed(), remaining)
            except asyncio.TimeoutError:
                log.warning("drain deadline passed: closing remaining connections")
                self._ws.close(code=protocol.CLOSE_GOING_AWAY, reason=protocol.REASON_SHUTDOWN)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._ws.wait_closed(), 2.0)

    async def _close_status_clients(self) -> None:
        """Close every status channel at once; any that has not answered the close within
        `STATUS_CLOSE_S` (a client that stopped reading) is aborted."""
        clients = list(self._status_clients)
        if not clients:
            return
        closing = [asyncio.ensure_future(
            c.close(protocol.CLOSE_GOING_AWAY, protocol.REASON_SHUTDOWN)) for c in clients]
        _, stuck = await asyncio.wait(closing, timeout=STATUS_CLOSE_S)
        for task in stuck:
            task.cancel()
        for conn in clients:
            if conn.state is not State.CLOSED:
                conn.transport.abort()
        await asyncio.gather(*closing, return_exceptions=True)

    def _connection(self, *args: Any, **kwargs: Any) -> ServerConnection:
        """websockets' connection factory: each connection counts as pending (see
        `PendingCap`) from its TCP accept until it authenticates or closes."""
        conn = _CountedConnection(*args, **kwargs)
        conn.pending = self._pending
        return conn

    # --- routing (before the upgrade) ---
    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        try:
            path = urlsplit(request.path).path
        except ValueError:  # `GET //[`: not a path at all
            return protocol.json_response(
                400, protocol.error_body("BAD_REQUEST", "the request path is not a valid URL"))
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
            refusal = self._authenticate(connection, request, path)
            if refusal is not None:
                return refusal
        self._pending.done(connection)
        if path == "/ready":
            return protocol.json_response(200 if self.status.ready else 503,
                                          self._snapshot(connection))
        if path == "/metrics":
            return protocol.text_response(200, self.metrics.render(), self.metrics.content_type)
        if path == PATH_LISTEN:
            if self.listen is None:
                return protocol.json_response(
                    503, protocol.error_body("UNAVAILABLE", "sessions are not available yet")
                )
            return self.listen.accept(connection, request)
        if len(self._status_clients) >= self.settings.edge_max_status_clients:
            return protocol.json_response(
                503, protocol.error_body(
                    "TOO_MANY_STATUS_CLIENTS", f"at capacity: "
                    f"{self.settings.edge_max_status_clients} status clients (EDGE_MAX_STATUS_CLIENTS)"),
                headers=[("Retry-After", "5")])
        return None  # /v1/status: continue the websocket handshake

    def _authenticate(
        self, connection: ServerConnection, request: Request, path: str
    ) -> Response | None:
        """None if the request carries a key (and marks an operator key on the connection),
        else the refusal: 429 while its address bucket is throttled, 401 otherwise."""
        address = str(connection.remote_address[0]) if connection.remote_address else "?"
        bucket = throttle_key(address)
        now = time.monotonic()
        if self._throttle.blocked(bucket, now):
            self.metrics.auth_throttled.inc()
            return protocol.too_many_attempts(self.settings.edge_auth_window_s)
        token = protocol.request_token(request.headers)
        if protocol.key_matches(token, self._keys):
            if self._admin_keys and protocol.key_matches(token, self._admin_keys):
                connection.edge_admin = True  # type: ignore[attr-defined]
            return None
        self._throttle.failed(bucket, now)
        self.metrics.auth_failures.inc()
        if self._auth_log.take(now):
            # Never the key itself: it may be a real key with a typo, or another service's.
            log.warning("refused %s from %s: %s%s", path, address,
                        "wrong key" if token else "no key",
                        f" ({self._auth_log_suppressed} more not logged)"
                        if self._auth_log_suppressed else "")
            self._auth_log_suppressed = 0
        else:
            self._auth_log_suppressed += 1
        return protocol.unauthorized()

    def _snapshot(self, connection: ServerConnection) -> dict[str, Any]:
        """The full status for an operator key (or when no keys are configured at all),
        else the summary (`Status.public_snapshot`)."""
        if not self._keys or getattr(connection, "edge_admin", False):
            return self.status.snapshot()
        return self.status.public_snapshot()

    async def _handler(self, connection: ServerConnection) -> None:
        path = urlsplit(connection.request.path).path
        if path == PATH_LISTEN and self.listen is not None:
            await self.listen.handle(connection)
        elif path == PATH_STATUS:
            await self._status_channel(connection)

    async def _status_channel(self, connection: ServerConnection) -> None:
        """Snapshot on connect, then one per change, and a heartbeat when nothing changes.
        The channel is one-way: any data frame from the client closes it 1008."""
        if len(self._status_clients) >= self.settings.edge_max_status_clients:
            await connection.close(protocol.CLOSE_TRY_AGAIN, protocol.REASON_AT_CAPACITY)
            return
        # The parser reads the limit per frame (`max_message_size` since websockets 15,
        # `max_size` before).
        limit = "max_message_size" if hasattr(connection.protocol, "max_message_size") else "max_size"
        setattr(connection.protocol, limit, STATUS_MAX_INBOUND)
        self._status_clients.add(connection)
        closed = asyncio.ensure_future(_refuse_data(connection))
        try:
            generation = self.status.generation
            await connection.send(json.dumps(self._snapshot(connection)))
            while not closed.done():
                changed = asyncio.ensure_future(
                    self.status.wait_changed(generation, self.settings.edge_status_heartbeat_s)
                )
                await asyncio.wait({changed, closed}, return_when=asyncio.FIRST_COMPLETED)
                if closed.done():
                    changed.cancel()
                    break
                generation = changed.result()
                await connection.send(json.dumps(self._snapshot(connection)))
        except ConnectionClosed:
            pass
        finally:
            closed.cancel()
            self._status_clients.discard(connection)


class _CountedConnection(ServerConnection):
    """A connection that leaves the server's `PendingCap` when it closes."""

    pending: PendingCap

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.pending.add(self, transport.abort)

    def connection_lost(self, exc: Exception | None) -> None:
        self.pending.done(self)
        super().connection_lost(exc)


async def _refuse_data(connection: ServerConnection) -> None:
    """Returns when the status channel is closed: by the client, or by us (1008) because
    it sent a data frame."""
    with contextlib.suppress(ConnectionClosed):
        await connection.recv()
        await connection.close(protocol.CLOSE_POLICY, protocol.REASON_DATA_FRAME)
    await connection.wait_closed()


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
