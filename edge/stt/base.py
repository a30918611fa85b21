"""The upstream contract, shared by the session and every upstream implementation.

An upstream turns a session's audio into transcript events:

    stream(audio, config) -> async iterator of TranscriptEvent
    capabilities(model, language) -> Capabilities(diarization: bool, reason)

`audio` yields `AudioBlock`s (16 kHz mono linear16 on the session clock, edge/clock.py) and
`FLUSH` markers. A `FLUSH` asks the upstream to finalize everything received so far
(Deepgram's `Finalize`): it answers with the finals for that audio and then one
`TranscriptEvent(kind="flushed")`.
When `audio` ends (CloseStream), the upstream emits every remaining final and then ends.
All times in events are seconds on the session clock (since the session's first sample).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Final, Literal, Protocol

# The audio an upstream takes is on the session clock; its types live with the clock.
from edge.clock import SAMPLE_RATE, AudioBlock


class _Flush:
    def __repr__(self) -> str:
        return "FLUSH"


FLUSH: Final = _Flush()
AudioItem = AudioBlock | _Flush


@dataclass(frozen=True)
class StreamConfig:
    """What one session asks of the upstream (from the handshake's query and the settings)."""

    language: str
    model: str
    interim_results: bool = False
    punctuate: bool = True
    diarize: bool = False  # ask the upstream for speaker labels (the session plan decides)
    vad_events: bool = False
    max_speakers: int = 4


@dataclass(frozen=True)
class Capabilities:
    """Whether the upstream labels speakers for a config, and if not, why."""

    diarization: bool
    reason: str | None = None


@dataclass(frozen=True)
class Word:
    word: str
    start: float
    end: float
    confidence: float = 0.0
    punctuated_word: str | None = None
    speaker_label: str | None = None  # the upstream's own label, when it diarizes


EventKind = Literal["result", "speech_started", "speech_ended", "flushed", "error"]


@dataclass(frozen=True)
class TranscriptEvent:
    """One thing the upstream says. `start`/`end` are session seconds.

    kind="result": a transcript (interim unless `is_final`; whether a final ends speech is
    the session's decision, edge/endpoint.py). kind="speech_started"/"speech_ended": voice
    activity at `start`.
    kind="flushed": everything before a FLUSH has been delivered. kind="error": `message`
    says what went wrong; `fatal` means the upstream ended for this session; `lost_s` counts
    audio that will never be transcribed (an outage longer than the replay buffer).
    """

    kind: EventKind
    start: float = 0.0
    end: float = 0.0
    is_final: bool = False
    transcript: str = ""
    confidence: float = 0.0
    words: tuple[Word, ...] = field(default_factory=tuple)
    language: str | None = None
    message: str | None = None
    fatal: bool = False
    lost_s: float = 0.0


class Upstream(Protocol):
    """A speech-to-text service. One instance per daemon; one `stream()` per session."""

    def capabilities(self, model: str, language: str) -> Capabilities: ...

    def stream(
        self, audio: AsyncIterator[AudioItem], config: StreamConfig
    ) -> AsyncIterator[TranscriptEvent]: ...

    async def close(self) -> None: ...


__all__ = [
    "FLUSH",
    "SAMPLE_RATE",  # re-exported from edge.clock (its one definition)
    "AudioBlock",  # re-exported from edge.clock (its one definition)
    "AudioItem",
    "Capabilities",
    "StreamConfig",
    "TranscriptEvent",
    "Upstream",
    "Word",
]
