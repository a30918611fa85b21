"""The wire protocol, with no sockets in sight: auth, HTTP answers, close codes, client frames.

Everything here takes plain values (headers, query strings, text) and returns plain values
or raises an exact exception, so its tests need no server. The reference is
docs/PROTOCOL.md. Two parts live in their own modules and are re-exported here, so callers
import the protocol from one place:
- `edge.query`: the `/v1/listen` query string (`parse_listen_query`, `ListenParams`);
- `edge.messages`: what the daemon sends a client (`results_message`, `ModelInfo`, ...).
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Iterable
from http import HTTPStatus
from typing import Any, Literal

from websockets.datastructures import Headers
from websockets.http11 import Response

from edge.messages import (
    ModelInfo,
    error_message,
    metadata_message,
    results_message,
    speaker_turn_message,
    speech_started_message,
    utterance_end_message,
    word_entry,
)
from edge.query import ENCODINGS, MULTILINGUAL, ListenParams, QueryError, parse_listen_query

# Close codes (docs/PROTOCOL.md). Reasons are short, stable strings clients may match on.
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_INTERNAL = 1011
CLOSE_TRY_AGAIN = 1013
REASON_IDLE = "NET-0001"
REASON_SHUTDOWN = "server shutting down"
REASON_FRAME_TOO_LARGE = "frame too large"
REASON_NOT_READING = "client not reading"
REASON_AT_CAPACITY = "at capacity"
REASON_BAD_AUDIO = "DATA-0000"  # Deepgram's: the payload cannot be decoded as audio
REASON_DECODER_LOST = "decoder unavailable"
REASON_TOO_MANY_FRAMES = "too many frames"
REASON_DATA_FRAME = "no data frames on this channel"

AUTH_SCHEMES = ("token", "bearer")


def request_token(headers: Headers) -> str | None:
    """The API key a request carries, or None.

    Accepted: `Authorization: Token <key>` or `Bearer <key>` (any case), and for browsers,
    which cannot set headers, the subprotocols `["token", "<key>"]` or `["bearer", "<key>"]`.
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
    if len(offered) >= 2 and offered[0].lower() in AUTH_SCHEMES and offered[1]:
        return offered[1]
    return None


def auth_subprotocol(offered: Iterable[str]) -> str | None:
    """The subprotocol to echo for a browser that authenticated with one (`token` or
    `bearer`, as offered), or None: a browser fails a handshake that echoes none it offered."""
    for name in offered:
        if name.lower() in AUTH_SCHEMES:
            return name
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


def too_many_attempts(retry_after_s: float) -> Response:
    """HTTP 429 with `Retry-After` (whole seconds, at least 1) after failed authentications."""
    return json_response(
        429,
        error_body("TOO_MANY_REQUESTS", "too many failed authentication attempts"),
        headers=[("Retry-After", str(max(1, int(retry_after_s))))],
    )


def json_response(
    status: int, body: dict[str, Any], headers: Iterable[tuple[str, str]] = ()
) -> Response:
    """A complete HTTP response with a JSON body (handshake refusals and probes)."""
    data = json.dumps(body, separators=(",", ":")).encode()
    return _response(status, data, "application/json", headers)


def text_response(status: int, body: bytes, content_type: str) -> Response:
    """A complete HTTP response with a body of `content_type` (e.g. Prometheus text)."""
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
    """HTTP 401 `INVALID_AUTH` for a missing or wrong key, refused at the handshake."""
    return json_response(
        401,
        error_body("INVALID_AUTH", "Invalid credentials: send 'Authorization: Token <key>'"),
        headers=[("WWW-Authenticate", 'Token realm="edge"')],
    )


def bad_query(exc: QueryError) -> Response:
    """The handshake's answer to a bad query: HTTP 400 `INVALID_QUERY_PARAMETER` naming it."""
    return json_response(400, error_body("INVALID_QUERY_PARAMETER", str(exc)))


# --- client text frames ---

Control = Literal["KeepAlive", "Finalize", "CloseStream", "Configure"]
CONTROLS: tuple[Control, ...] = ("KeepAlive", "Finalize", "CloseStream", "Configure")


MAX_TEXT_BYTES = 4096  # a control message is ~30 bytes; anything longer is refused unparsed


class ControlError(ValueError):
    """A text frame that is not a control message we know; `str()` says why."""


def parse_control(text: str) -> Control:
    """`{"type": "KeepAlive" | "Finalize" | "CloseStream" | "Configure", ...}` -> the type.

    Raises ControlError (never anything else) for a frame over `MAX_TEXT_BYTES`, one that is
    not JSON or nested too deeply to parse, or a JSON value that is not such an object.
    """
    if len(text) > MAX_TEXT_BYTES:
        raise ControlError(f"text frame of {len(text)} characters: control messages are at "
                           f"most {MAX_TEXT_BYTES}")
    try:
        msg = json.loads(text)
    except ValueError:
        raise ControlError("text frame is not JSON") from None
    except RecursionError:
        raise ControlError("text frame is JSON nested too deeply") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise ControlError("text frame must be a JSON object with a string 'type'")
    if msg["type"] not in CONTROLS:
        raise ControlError(f"unsupported message type {msg['type'][:40]!r}; "
                           "expected KeepAlive, Finalize, CloseStream or Configure")
    return msg["type"]  # type: ignore[no-any-return]


def configure_reply(text: str, request_id: str) -> dict[str, Any]:
    """The answer to a `Configure` text frame (already known to be one).

    Deepgram's Configure may replace `keyterms` and switch formatting `features`. Neither can
    change on a running Google stream, so any of them gets `ConfigureFailure` saying which;
    a Configure that asks for no change gets `ConfigureSuccess`.
    """
    msg = json.loads(text)
    keyterms, features = msg.get("keyterms"), msg.get("features")
    if keyterms is not None:
        return configure_failure(request_id, "CONFIGURE_KEYTERMS_NOT_SUPPORTED",
                                 "keyterms cannot change mid-stream on this appliance's upstream")
    if features:
        names = ", ".join(sorted(map(str, features)))[:200] if isinstance(features, dict) else "?"
        return configure_failure(request_id, "CONFIGURE_FEATURES_NOT_SUPPORTED",
                                 f"features cannot change mid-stream: {names}")
    return {"type": "ConfigureSuccess", "request_id": request_id}


def configure_failure(request_id: str, code: str, description: str) -> dict[str, Any]:
    """`ConfigureFailure`: the Configure was refused; `code` is stable, `description` says why."""
    return {"type": "ConfigureFailure", "request_id": request_id, "code": code,
            "description": description}


__all__ = [
    "CLOSE_GOING_AWAY",
    "CLOSE_INTERNAL",
    "CLOSE_NORMAL",
    "CLOSE_POLICY",
    "CLOSE_TRY_AGAIN",
    "ENCODINGS",
    "MULTILINGUAL",
    "REASON_DECODER_LOST",
    "REASON_IDLE",
    "ControlError",
    "ListenParams",
    "ModelInfo",
    "QueryError",
    "bad_query",
    "configure_reply",
    "error_body",
    "error_message",
    "json_response",
    "key_matches",
    "metadata_message",
    "parse_control",
    "parse_listen_query",
    "request_token",
    "results_message",
    "speaker_turn_message",
    "speech_started_message",
    "unauthorized",
    "utterance_end_message",
    "word_entry",
]
