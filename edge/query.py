"""The `/v1/listen` query string: Deepgram's parameters, validated (no sockets, no I/O).

`parse_listen_query` turns a query string into a frozen `ListenParams` or raises `QueryError`
naming the first bad parameter, its value and what is allowed; the handshake answers that with
HTTP 400 (`protocol.bad_query`). Value ranges are Deepgram's own; parameters edge does not
honour are accepted and named once in a warning. The table of parameters is in
docs/PROTOCOL.md.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

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


__all__ = [
    "DEEPGRAM_MODEL_PREFIXES",
    "DEFAULT_ENDPOINTING_MS",
    "ENCODINGS",
    "ENCODING_RATES",
    "HONOURED",
    "MAX_CHANNELS",
    "MULTILINGUAL",
    "ListenParams",
    "QueryError",
    "parse_listen_query",
]
