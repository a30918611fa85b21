"""What the daemon sends a `/v1/listen` client: Deepgram's message shapes as plain dicts.

Each function takes plain values on the session clock (seconds) and returns the JSON object
to send; none sends anything itself. `speaker_source`, `speaker_note`, `diarize_info` and
`SpeakerTurn` are our extensions, which Deepgram's SDKs carry through as extra fields
(docs/PROTOCOL.md). Times are rounded to milliseconds, confidences to 4 places.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any


@dataclass(frozen=True)
class ModelInfo:
    """A model as `Results.metadata.model_info` names it; `uuid` is stable for the triple."""

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
    """A Deepgram `Results` message for the span `start`..`end` (session seconds).

    `words` are `word_entry()` dicts; `speaker_source` ("google", "sortformer" or None) is our
    extension, and `diarizer`, when given, adds `metadata.diarize_info`. `channel` is
    `[index, count]`. `speech_final` is decided later (edge/endpoint.py) and may be rewritten.
    """
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
    """One entry of `Results...words`; `speaker` is the client's number (None: unknown), and
    `punctuated_word` falls back to `word` when the upstream gave no punctuated form."""
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
    """The `Metadata` message sent once after CloseStream has flushed every final:
    `duration` seconds of audio received, their `sha256`, the `models` that served them."""
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
    """An `Error` message for a recoverable problem (the stream continues): `variant` is a
    stable code, `description` one line; `extra` adds fields (e.g. `lost_s`)."""
    return {"type": "Error", "variant": variant, "description": description,
            "message": description, **extra}


def speech_started_message(t: float, channel: tuple[int, int] = (0, 1)) -> dict[str, Any]:
    """`SpeechStarted` (sent with `vad_events=true`): speech began at `t` session seconds."""
    return {"type": "SpeechStarted", "channel": list(channel), "timestamp": round(t, 3)}


def utterance_end_message(last_word_end: float, channel: tuple[int, int] = (0, 1)
                          ) -> dict[str, Any]:
    """`UtteranceEnd` (sent with `utterance_end_ms`): a gap began after `last_word_end`."""
    return {"type": "UtteranceEnd", "channel": list(channel),
            "last_word_end": round(last_word_end, 3)}


def speaker_turn_message(speaker: int, start: float, end: float, is_final: bool,
                         channel: tuple[int, int] = (0, 1)) -> dict[str, Any]:
    """Our extension (only with `speaker_turns=true`): a speaker turn from the local diarizer."""
    return {"type": "SpeakerTurn", "speaker": speaker, "start": round(start, 3),
            "end": round(end, 3), "is_final": is_final, "channel_index": list(channel)}


__all__ = [
    "ModelInfo",
    "error_message",
    "metadata_message",
    "results_message",
    "speaker_turn_message",
    "speech_started_message",
    "utterance_end_message",
    "word_entry",
]
