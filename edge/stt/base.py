"""The upstream contract, shared by the session and every upstream implementation.

An upstream turns a session's audio into transcript events:

    open_run(config) -> UpstreamRun: push(block), flush(), end(); events() -> TranscriptEvents
    capabilities(model, language) -> Capabilities(diarization: bool, reason)

The channel calls the run's `push`/`flush`/`end` in the task that receives the audio: they
never wait and never raise, and the run takes them in the order they are called (a flush
covers exactly the audio pushed before it). Blocks are 16 kHz mono linear16 on the session
clock (edge/clock.py). `flush()` asks the upstream to finalize everything pushed so far
(Deepgram's `Finalize`): it answers with the finals for that audio and then one
`TranscriptEvent(kind="flushed")`. After `end()` (CloseStream) the upstream emits every
remaining final and then `events()` ends; audio pushed after `end()` is ignored.
The run holds the audio it has not finalized within ONE bound of its own, dropping the oldest
and reporting what that loses as an `error` event with `lost_s` (Google's: the replay buffer,
edge/stt/replay.py). All times in events are seconds on the session clock.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

# The audio an upstream takes is on the session clock; its types live with the clock.
from edge.clock import SAMPLE_RATE, AudioBlock


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
    kind="flushed": everything pushed before a `flush()` has been delivered.
    kind="error": `message` says what went wrong; `fatal` means the upstream ended for this
    session; `lost_s` counts audio that will never be transcribed (dropped by the run's bound:
    an outage longer than the replay buffer).
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


class UpstreamRun(Protocol):
    """One session's audio in, its transcript events out (see the module docstring)."""

    def push(self, block: AudioBlock) -> None: ...  # never waits; bounded (drops the oldest)

    def flush(self) -> None: ...  # finalize what was pushed so far, then say "flushed"

    def end(self) -> None: ...  # the end of the audio: the rest of the finals, then stop

    def events(self) -> AsyncIterator[TranscriptEvent]: ...  # iterate once; closing it cancels


class Upstream(Protocol):
    """A speech-to-text service. One instance per daemon; one `open_run()` per session channel."""

    def capabilities(self, model: str, language: str) -> Capabilities: ...

    def open_run(self, config: StreamConfig) -> UpstreamRun: ...

    async def close(self) -> None: ...


__all__ = [
    "SAMPLE_RATE",  # re-exported from edge.clock (its one definition)
    "AudioBlock",  # re-exported from edge.clock (its one definition)
    "Capabilities",
    "StreamConfig",
    "TranscriptEvent",
    "Upstream",
    "UpstreamRun",
    "Word",
]
