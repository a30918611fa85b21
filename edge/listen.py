"""The `/v1/listen` service: handshake checks, the session registry, idle reaping, drain.

`Server` calls `accept()` before the upgrade (so bad queries get HTTP 400 and a full house
HTTP 503, never an open-then-close) and `handle()` after it; the query is parsed once, in
`accept()`, and its `ListenParams` wait there for `handle()`. One housekeeping task closes
sessions idle for `EDGE_IDLE_TIMEOUT_S` (1011 NET-0001) — one timer for all sessions
instead of one per frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
import weakref
from urllib.parse import urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

from edge import protocol
from edge.session import Session, SessionDeps

log = logging.getLogger("edge.listen")

REAP_INTERVAL_S = 0.5


class ListenService:
    def __init__(self, deps: SessionDeps) -> None:
        self.deps = deps
        self.sessions: dict[str, Session] = {}
        # Accepted handshakes' parameters until their handler runs. Weak: a connection that
        # dies between accept() and handle() takes its entry with it.
        self._accepted: weakref.WeakKeyDictionary[ServerConnection, protocol.ListenParams] = (
            weakref.WeakKeyDictionary())
        self._reaper: asyncio.Task[None] | None = None
        self._draining = False
        self._empty = asyncio.Event()
        self._empty.set()

    @property
    def max_sessions(self) -> int:
        return self.deps.settings.edge_max_sessions

    def start(self) -> None:
        self._reaper = asyncio.create_task(self._reap_idle(), name="idle-reaper")

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper

    # --- ListenService protocol (edge.server) ---
    def accept(self, connection: ServerConnection, request: Request) -> Response | None:
        """Validate the query and capacity before the upgrade: a refusal, or None (the
        parameters are kept for `handle(connection)`)."""
        try:
            params = protocol.parse_listen_query(urlsplit(request.path).query)
        except protocol.QueryError as exc:
            self.deps.metrics.sessions_refused.labels("bad_query").inc()
            return protocol.bad_query(exc)
        if self._draining:
            return protocol.json_response(
                503, protocol.error_body("SHUTTING_DOWN", "the daemon is shutting down"),
                headers=[("Retry-After", "5")])
        if len(self.sessions) >= self.max_sessions:
            self.deps.metrics.sessions_refused.labels("capacity").inc()
            return protocol.json_response(
                503,
                protocol.error_body(
                    "TOO_MANY_SESSIONS", f"at capacity: {self.max_sessions} sessions open"),
                headers=[("Retry-After", "5")],
            )
        self._accepted[connection] = params
        return None

    async def handle(self, connection: ServerConnection) -> None:
        params = self._accepted.pop(connection, None)
        if params is None:  # the server sends every /v1/listen handshake through accept()
            raise RuntimeError("a /v1/listen connection that accept() did not accept")
        if len(self.sessions) >= self.max_sessions or self._draining:
            # Lost a race with another handshake after accept(): the documented 1013.
            self.deps.metrics.sessions_refused.labels("capacity").inc()
            await connection.close(protocol.CLOSE_TRY_AGAIN, protocol.REASON_AT_CAPACITY)
            return
        request_id = str(uuid.uuid4())
        session = Session(connection, params, self.deps, request_id)
        self.sessions[request_id] = session
        self._count()
        started = time.monotonic()
        end = "error"
        try:
            end = await session.run()
        except Exception:
            log.exception("session %s failed", request_id)
            raise
        finally:
            del self.sessions[request_id]
            self._count()
            self.deps.metrics.sessions_total.labels(end).inc()
            log.info("session %s ended (%s) after %.1f s, %.1f s of audio",
                     request_id, end, time.monotonic() - started, session.audio.duration)

    async def drain(self, timeout: float) -> None:
        """Every open session flushes its finals and Metadata, then closes 1001."""
        self._draining = True
        sessions = list(self.sessions.values())
        for session in sessions:
            session.end("shutdown")
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._empty.wait(), timeout)
        if self.sessions:
            log.warning("%d session(s) still open after the drain deadline", len(self.sessions))

    # --- housekeeping ---
    def _count(self) -> None:
        n = len(self.sessions)
        if n:
            self._empty.clear()
        else:
            self._empty.set()
        self.deps.status.set_sessions(n)
        self.deps.metrics.sessions_active.set(n)

    async def _reap_idle(self) -> None:
        idle = self.deps.settings.edge_idle_timeout_s
        while True:
            await asyncio.sleep(REAP_INTERVAL_S)
            now = time.monotonic()
            for session in list(self.sessions.values()):
                if now - session.last_activity > idle:
                    session.end("idle")


__all__ = ["ListenService"]
