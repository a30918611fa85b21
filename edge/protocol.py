"""The wire protocol, with no sockets in sight: auth, HTTP answers, close codes.

Everything here takes plain values (headers, query strings, text) and returns plain values
or raises an exact exception, so its tests need no server. See PROTOCOL.md.
"""

from __future__ import annotations

import hmac
import json
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from http import HTTPStatus
from typing import Any, Literal
from urllib.parse import parse_qs

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
REASON_NOT_READING = "client not reading"
REASON_AT_CAPACITY = "at capacity"
REASON_BAD_AUDIO = "DATA-0000"  # Deepgram's: the payload cannot be decoded as audio
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


# --- /v1/listen query parameters ---

# Deepgram's `encoding` values. Without `encoding` the stream's first bytes decide
# (containers: Ogg, WebM, WAV, FLAC, MP3, AAC/MP4), else linear16 at `sample_rate`.
ENCODINGS = ("linear16", "linear32", "flac", "mulaw", "alaw", "amr-nb", "amr-wb", "opus",
             "ogg-opus", "speex", "g729")
MIN_RATE, MAX_RATE = 8000, 48000
# Codecs that only exist at some rates (Deepgram: amr-nb needs 8000, amr-wb 16000); with
# `sample_rate` absent they take the first. Containers (flac, ogg-opus) carry their own rate.
ENCODING_RATES: dict[str, tuple[int, ...]] = {
    "amr-nb": (8000,), "amr-wb": (16000,), "g729": (8000,),
    "opus": (48000, 24000, 16000, 12000, 8000), "speex": (16000, 8000, 32000),
}
_LANGUAGE = re.compile(r"^(auto|multi|[A-Za-z]{2,3}(-[A-Za-z0-9]{1,8})*)$")
MULTILINGUAL = "multi"  # Deepgram's code-switching language: the upstream's multilingual mode
MAX_CHANNELS = 32  # an upstream stream and a diarizer session each: bounded per session
DEFAULT_ENDPOINTING_MS = 10  # Deepgram's default
MAX_MS = 600_000  # endpointing / utterance_end_ms: Deepgram sets no upper bound; 10 min is ours
# The query parameters edge honours; any other is accepted and named once in a warning.
HONOURED = frozenset({
    "encoding", "sample_rate", "channels", "multichannel", "language", "model", "diarize",
    "interim_results", "punctuate", "smart_format", "vad_events", "utterance_end_ms",
    "endpointing", "speaker_turns",
})
_MODEL = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
# Deepgram's own model names mean nothing to Google: a Deepgram SDK sends nova-3 by default,
# so these select the daemon's configured model instead of being forwarded.
DEEPGRAM_MODEL_PREFIXES = ("nova", "enhanced", "base", "whisper", "general", "meeting", "phonecall")


class QueryError(ValueError):
    """A bad query parameter; `str()` names the parameter, the value and what is allowed."""

    def __init__(self, name: str, value: str, allowed: str) -> None:
        super().__init__(f"{name}={value!r}: {allowed}")
        self.name = name


@dataclass(frozen=True)
class ListenParams:
    """A validated `/v1/listen` query. `language`/`model` are None when the client left
    them to the daemon's settings; `diarize` is None when the client did not say (the
    session plan applies `EDGE_DIARIZE_DEFAULT`); `endpointing` is None when turned off;
    `ignored` names the parameters accepted but not honoured (sorted, for one warning)."""

    encoding: str | None = None  # None: not given, the first bytes decide
    sample_rate: int = 16000
    channels: int = 1
    multichannel: bool = False
    language: str | None = None
    model: str | None = None
    diarize: bool | None = None
    interim_results: bool = False
    punctuate: bool = True
    smart_format: bool = False
    vad_events: bool = False
    utterance_end_ms: int | None = None
    endpointing: int | None = DEFAULT_ENDPOINTING_MS
    speaker_turns: bool = False
    ignored: tuple[str, ...] = ()


def parse_listen_query(query: str) -> ListenParams:
    """Parse and validate a `/v1/listen` query string (the last of a repeated key wins).

    Value ranges are Deepgram's own: a value Deepgram refuses raises `QueryError` naming the
    first bad parameter; a parameter edge does not honour is accepted and named in `ignored`.
    """
    raw = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
    kw: dict[str, Any] = {}
    if "encoding" in raw:
        enc = raw["encoding"].lower()
        if enc not in ENCODINGS:
            raise QueryError("encoding", raw["encoding"], "one of " + ", ".join(ENCODINGS))
        kw["encoding"] = enc
    if "sample_rate" in raw:
        kw["sample_rate"] = _int(raw, "sample_rate", MIN_RATE, MAX_RATE)
    rates = ENCODING_RATES.get(kw.get("encoding", ""))
    if rates is not None:
        if "sample_rate" not in kw:
            kw["sample_rate"] = rates[0]
        elif kw["sample_rate"] not in rates:
            raise QueryError("sample_rate", raw["sample_rate"], f"encoding={kw['encoding']} "
                             "needs one of " + ", ".join(map(str, rates)))
    if "channels" in raw:
        kw["channels"] = _int(raw, "channels", 1, MAX_CHANNELS)
    if raw.get("language"):
        if not _LANGUAGE.match(raw["language"]):
            raise QueryError("language", raw["language"],
                             "a BCP-47 code (e.g. en-US), auto, or multi")
        kw["language"] = raw["language"]
    if raw.get("model"):
        model = raw["model"]
        if not _MODEL.match(model):
            raise QueryError("model", model, "letters, digits, '_', '-', '.' (at most 64)")
        if not model.lower().startswith(DEEPGRAM_MODEL_PREFIXES):
            kw["model"] = model
    for name in ("diarize", "interim_results", "punctuate", "smart_format", "vad_events",
                 "speaker_turns", "multichannel"):
        if name in raw:
            kw[name] = _bool(raw, name)
    if raw.get("utterance_end_ms"):
        kw["utterance_end_ms"] = _int(raw, "utterance_end_ms", 0, MAX_MS)
    if raw.get("endpointing"):
        value = raw["endpointing"].lower()
        if value == "false":
            kw["endpointing"] = None
        elif value != "true":  # true: Deepgram's default
            kw["endpointing"] = _int(raw, "endpointing", 0, MAX_MS, "true, false or ")
    kw["ignored"] = tuple(sorted(k for k in raw if k not in HONOURED))
    return ListenParams(**kw)


def _int(raw: Mapping[str, str], name: str, lo: int, hi: int, also: str = "") -> int:
    try:
        value = int(raw[name])
    except ValueError:
        raise QueryError(name, raw[name], f"{also}an integer from {lo} to {hi}") from None
    if not lo <= value <= hi:
        raise QueryError(name, raw[name], f"{also}an integer from {lo} to {hi}")
    return value


def _bool(raw: Mapping[str, str], name: str) -> bool:
    value = raw[name].lower()
    if value not in ("true", "false"):
        raise QueryError(name, raw[name], "true or false")
    return value == "true"


def bad_query(exc: QueryError) -> Response:
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
    return {"type": "ConfigureFailure", "request_id": request_id, "code": code,
            "description": description}


# --- daemon -> client messages ---

@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    arch: str

    @property
    def uuid(self) -> str:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"edge:{self.arch}:{self.name}:{self.version}"))


def results_message(
    *,
    request_id: str,
    model: ModelInfo,
    start: float,
    end: float,
    is_final: bool,
    speech_final: bool,
    from_finalize: bool,
    transcript: str,
    confidence: float,
    words: list[dict[str, Any]],
    speaker_source: str | None,
    diarizer: ModelInfo | None = None,
    channel: tuple[int, int] = (0, 1),
) -> dict[str, Any]:
    """A Deepgram `Results` message; `speaker_source` is our extension field."""
    metadata: dict[str, Any] = {
        "request_id": request_id,
        "model_info": {"name": model.name, "version": model.version, "arch": model.arch},
        "model_uuid": model.uuid,
    }
    if diarizer is not None:
        metadata["diarize_info"] = {"model_uuid": diarizer.uuid, "arch": diarizer.arch}
    return {
        "type": "Results",
        "channel_index": list(channel),
        "duration": round(max(0.0, end - start), 3),
        "start": round(start, 3),
        "is_final": is_final,
        "speech_final": speech_final,
        "from_finalize": from_finalize,
        "channel": {"alternatives": [
            {"transcript": transcript, "confidence": round(confidence, 4), "words": words}
        ]},
        "metadata": metadata,
        "speaker_source": speaker_source,
    }


def word_entry(
    word: str, start: float, end: float, confidence: float, punctuated: str | None,
    speaker: int | None, speaker_confidence: float | None,
) -> dict[str, Any]:
    return {
        "word": word,
        "start": round(start, 3),
        "end": round(end, 3),
        "confidence": round(confidence, 4),
        "punctuated_word": punctuated if punctuated is not None else word,
        "speaker": speaker,
        "speaker_confidence": None if speaker_confidence is None else round(speaker_confidence, 3),
    }


def metadata_message(
    *, request_id: str, duration: float, sha256: str, created: datetime, models: list[ModelInfo],
    channels: int = 1,
) -> dict[str, Any]:
    return {
        "type": "Metadata",
        "transaction_key": "deprecated",
        "request_id": request_id,
        "sha256": sha256,
        "created": created.astimezone(timezone.utc).isoformat().replace("+00:00", "Z"),
        "duration": round(duration, 3),
        "channels": channels,
        "models": [m.uuid for m in models],
        "model_info": {m.uuid: {"name": m.name, "version": m.version, "arch": m.arch}
                       for m in models},
    }


def error_message(variant: str, description: str, **extra: Any) -> dict[str, Any]:
    """A recoverable problem; the stream continues."""
    return {"type": "Error", "variant": variant, "description": description,
            "message": description, **extra}


def speech_started_message(t: float, channel: tuple[int, int] = (0, 1)) -> dict[str, Any]:
    return {"type": "SpeechStarted", "channel": list(channel), "timestamp": round(t, 3)}


def utterance_end_message(last_word_end: float, channel: tuple[int, int] = (0, 1)
                          ) -> dict[str, Any]:
    return {"type": "UtteranceEnd", "channel": list(channel),
            "last_word_end": round(last_word_end, 3)}


def speaker_turn_message(speaker: int, start: float, end: float, is_final: bool,
                         channel: tuple[int, int] = (0, 1)) -> dict[str, Any]:
    """Our extension (only with `speaker_turns=true`): a speaker turn from the local diarizer."""
    return {"type": "SpeakerTurn", "speaker": speaker, "start": round(start, 3),
            "end": round(end, 3), "is_final": is_final, "channel_index": list(channel)}


__all__ = [
    "CLOSE_GOING_AWAY",
    "CLOSE_INTERNAL",
    "CLOSE_NORMAL",
    "CLOSE_POLICY",
    "CLOSE_TRY_AGAIN",
    "REASON_IDLE",
    "ControlError",
    "ListenParams",
    "ModelInfo",
    "QueryError",
    "error_body",
    "json_response",
    "key_matches",
    "parse_control",
    "parse_listen_query",
    "request_token",
    "unauthorized",
]
