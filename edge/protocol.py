"""The wire protocol, with no sockets in sight: auth, HTTP answers, close codes.

Everything here takes plain values (headers, query strings, text) and returns plain values
or raises an exact exception, so its tests need no server. See PROTOCOL.md.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Iterable
from http import HTTPStatus
from typing import Any

from websockets.datastructures import Headers
from websockets.http11 import Response

# Close codes (PROTOCOL.md). Reasons are short, stable strings clients may match on.
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_INTERNAL = 1011
CLOSE_TRY_AGAIN = 1013
REASON_IDLE = "NET-0001"
REASON_SHUTDOWN = "server shutting down"
REASON_FRAME_TOO_LARGE = "frame too large"

AUTH_SCHEMES = ("token", "bearer")
SUBPROTOCOL_TOKEN = "token"


def request_token(headers: Headers) -> str | None:
    """The API key a request carries, or None.

    Accepted: `Authorization: Token <key>` or `Bearer <key>` (any case), and for browsers,
    which cannot set headers, the subprotocols `["token", "<key>"]`.
    """
    auth = headers.get("Authorization")
    if auth:
        scheme, _, value = auth.strip().partition(" ")
        if scheme.lower() in AUTH_SCHEMES and value.strip():
            return value.strip()
        return None
    offered = [
        p.strip() for h in headers.get_all("Sec-WebSocket-Protocol") for p in h.split(",")
    ]
    if len(offered) >= 2 and offered[0] == SUBPROTOCOL_TOKEN and offered[1]:
        return offered[1]
    return None


def key_matches(token: str | None, keys: Iterable[str]) -> bool:
    """Constant-time check of `token` against every configured key (no early exit)."""
    if token is None:
        return False
    given = token.encode()
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(given, key.encode())
    return ok


def json_response(
    status: int, body: dict[str, Any], headers: Iterable[tuple[str, str]] = ()
) -> Response:
    """A complete HTTP response with a JSON body (handshake refusals and probes)."""
    data = json.dumps(body, separators=(",", ":")).encode()
    return _response(status, data, "application/json", headers)


def text_response(status: int, body: bytes, content_type: str) -> Response:
    return _response(status, body, content_type, ())


def _response(
    status: int, body: bytes, content_type: str, headers: Iterable[tuple[str, str]]
) -> Response:
    h = Headers()
    h["Content-Type"] = content_type
    h["Content-Length"] = str(len(body))
    h["Cache-Control"] = "no-store"
    for name, value in headers:
        h[name] = value
    phrase = HTTPStatus(status).phrase
    return Response(status, phrase, h, body)


def error_body(err_code: str, err_msg: str, **extra: Any) -> dict[str, Any]:
    """Deepgram's handshake error shape: `{"err_code", "err_msg", ...}`."""
    return {"err_code": err_code, "err_msg": err_msg, **extra}


def unauthorized() -> Response:
    return json_response(
        401,
        error_body("INVALID_AUTH", "Invalid credentials: send 'Authorization: Token <key>'"),
        headers=[("WWW-Authenticate", 'Token realm="edge"')],
    )


__all__ = [
    "CLOSE_GOING_AWAY",
    "CLOSE_INTERNAL",
    "CLOSE_NORMAL",
    "CLOSE_POLICY",
    "CLOSE_TRY_AGAIN",
    "REASON_IDLE",
    "error_body",
    "json_response",
    "key_matches",
    "request_token",
    "unauthorized",
]
