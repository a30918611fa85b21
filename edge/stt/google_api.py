"""Google Cloud Speech-to-Text v2 and v1 streaming: clients, requests and responses.

Imported only when an upstream is created (it pulls in grpc and the google packages), so the
daemon starts without paying for them when the upstream is off. Each API shape turns our
`StreamConfig` into the first (config) request, audio into audio requests, and responses into
the neutral `RawResult` / `RawSpeechEvent` of `edge.stt.replay`.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any, Literal

import grpc
from google.api_core import exceptions as gexc
from google.cloud import speech_v1, speech_v2
from google.cloud.speech_v1.services.speech.transports import (
    SpeechGrpcAsyncIOTransport as V1Transport,
)
from google.cloud.speech_v2.services.speech.transports import (
    SpeechGrpcAsyncIOTransport as V2Transport,
)

from edge.clock import SAMPLE_RATE
from edge.stt.base import StreamConfig
from edge.stt.replay import RawResult, RawSpeechEvent, RawWord

ErrorKind = Literal["retry", "unclear", "limit", "fatal"]

# Google's per-call limit surfaces as these: "start a new stream", not a failure.
LIMIT_ERRORS: tuple[type[Exception], ...] = (gexc.Aborted, gexc.OutOfRange)
RETRYABLE_ERRORS: tuple[type[Exception], ...] = (
    gexc.ServiceUnavailable, gexc.DeadlineExceeded, gexc.ResourceExhausted,
    # A reset connection or a proxy dropping the stream shows up as these.
    gexc.Unknown, gexc.Cancelled,
)
FATAL_ERRORS: tuple[type[Exception], ...] = (
    gexc.InvalidArgument, gexc.Unauthenticated, gexc.PermissionDenied, gexc.NotFound,
)


def classify(exc: BaseException) -> ErrorKind:
    """How to treat a failed streaming call: reconnect at once (`limit`), reconnect with
    backoff (`retry`), or end the session's upstream (`fatal`, also for anything unexpected).

    `unclear` (INTERNAL) is retried like `retry`, but it may hide another status: grpc.aio
    reports INTERNAL when the server's status races one of the client's writes
    (grpc/grpc#36066), so a refused config can look like it.
    """
    if isinstance(exc, LIMIT_ERRORS):
        return "limit"
    if isinstance(exc, gexc.InternalServerError):
        return "unclear"
    if isinstance(exc, RETRYABLE_ERRORS):
        return "retry"
    return "fatal"


def api_endpoint(location: str) -> str:
    """Google's host for a location: regional `{location}-speech.googleapis.com`, or the
    global `speech.googleapis.com`."""
    return "speech.googleapis.com" if location == "global" else f"{location}-speech.googleapis.com"


def _seconds(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    return float(value.seconds) + value.nanos / 1e9  # a raw protobuf Duration


def _client(module: Any, transport_cls: Any, *, endpoint: str, insecure: bool,
            credentials: Any) -> Any:
    # Must run inside the event loop that will use it (grpc.aio channels bind to it).
    if insecure:
        # Tests and on-prem proxies: a plaintext channel; with a channel the transport never
        # looks for credentials (docs/notes/google-speech.md).
        channel = grpc.aio.insecure_channel(endpoint)
        return module.SpeechAsyncClient(transport=transport_cls(channel=channel))
    return module.SpeechAsyncClient(credentials=credentials,
                                    client_options={"api_endpoint": endpoint})


class V2:
    """`google.cloud.speech.v2.Speech/StreamingRecognize` (primary)."""

    name = "v2"
    classify = staticmethod(classify)

    def __init__(self, project: str, location: str) -> None:
        self.recognizer = f"projects/{project}/locations/{location}/recognizers/_"

    def client(self, *, endpoint: str, insecure: bool, credentials: Any) -> Any:
        return _client(speech_v2, V2Transport, endpoint=endpoint, insecure=insecure,
                       credentials=credentials)

    def config_request(self, config: StreamConfig, *, diarize: bool) -> Any:
        m = speech_v2
        features = m.RecognitionFeatures(
            enable_word_time_offsets=True, enable_word_confidence=True,
            enable_automatic_punctuation=config.punctuate, max_alternatives=1,
        )
        if diarize:
            features.diarization_config = m.SpeakerDiarizationConfig(
                min_speaker_count=1, max_speaker_count=config.max_speakers)
        recognition = m.RecognitionConfig(
            explicit_decoding_config=m.ExplicitDecodingConfig(
                encoding=m.ExplicitDecodingConfig.AudioEncoding.LINEAR16,
                sample_rate_hertz=SAMPLE_RATE, audio_channel_count=1),
            model=config.model, language_codes=[config.language], features=features,
        )
        return m.StreamingRecognizeRequest(
            recognizer=self.recognizer,
            streaming_config=m.StreamingRecognitionConfig(
                config=recognition,
                streaming_features=m.StreamingRecognitionFeatures(
                    interim_results=config.interim_results,
                    enable_voice_activity_events=config.vad_events),
            ),
        )

    def audio_request(self, pcm: bytes) -> Any:
        return speech_v2.StreamingRecognizeRequest(audio=pcm)

    def parse(self, response: Any) -> tuple[list[RawResult], RawSpeechEvent | None]:
        return _parse(response, speech_v2, _V2_FIELDS)


class V1:
    """`google.cloud.speech.v1.Speech/StreamingRecognize`: for models and languages where v1
    diarizes. v1 needs one BCP-47 language (no `auto`)."""

    name = "v1"
    classify = staticmethod(classify)

    def client(self, *, endpoint: str, insecure: bool, credentials: Any) -> Any:
        return _client(speech_v1, V1Transport, endpoint=endpoint, insecure=insecure,
                       credentials=credentials)

    def config_request(self, config: StreamConfig, *, diarize: bool) -> Any:
        m = speech_v1
        if config.language == "auto":
            raise ValueError("language 'auto' needs EDGE_STT_API=v2 (v1 takes one BCP-47 code)")
        recognition = m.RecognitionConfig(
            encoding=m.RecognitionConfig.AudioEncoding.LINEAR16, sample_rate_hertz=SAMPLE_RATE,
            audio_channel_count=1, language_code=config.language, model=config.model,
            enable_word_time_offsets=True, enable_word_confidence=True,
            enable_automatic_punctuation=config.punctuate, max_alternatives=1,
        )
        if diarize:
            recognition.diarization_config = m.SpeakerDiarizationConfig(
                enable_speaker_diarization=True, min_speaker_count=1,
                max_speaker_count=config.max_speakers)
        return m.StreamingRecognizeRequest(streaming_config=m.StreamingRecognitionConfig(
            config=recognition, interim_results=config.interim_results,
            enable_voice_activity_events=config.vad_events))

    def audio_request(self, pcm: bytes) -> Any:
        return speech_v1.StreamingRecognizeRequest(audio_content=pcm)

    def parse(self, response: Any) -> tuple[list[RawResult], RawSpeechEvent | None]:
        if response.error.code:
            # v1 may report a failure in-band; treat it like the same status on the call.
            raise gexc.from_grpc_status(_status_code(response.error.code), response.error.message)
        return _parse(response, speech_v1, _V1_FIELDS)


# The two APIs' responses differ only in field names (event offset, word start, word end,
# result end) and in how a word's speaker is given (v2: a string label; v1: a number, 0 = none).
_Fields = tuple[str, str, str, str, Callable[[Any], "str | None"]]
_V2_FIELDS: _Fields = ("speech_event_offset", "start_offset", "end_offset", "result_end_offset",
              lambda w: w.speaker_label or None)
_V1_FIELDS: _Fields = ("speech_event_time", "start_time", "end_time", "result_end_time",
              lambda w: str(w.speaker_tag) if w.speaker_tag else None)


def _parse(response: Any, module: Any, fields: _Fields,
           ) -> tuple[list[RawResult], RawSpeechEvent | None]:
    event_at, word_start, word_end, result_end, speaker = fields
    kinds = module.StreamingRecognizeResponse.SpeechEventType
    event = None
    if response.speech_event_type in (kinds.SPEECH_ACTIVITY_BEGIN, kinds.SPEECH_ACTIVITY_END):
        event = RawSpeechEvent(
            "speech_started" if response.speech_event_type == kinds.SPEECH_ACTIVITY_BEGIN
            else "speech_ended", _seconds(getattr(response, event_at)))
    results = []
    for r in response.results:
        if not r.alternatives:
            continue
        alt = r.alternatives[0]
        results.append(RawResult(
            is_final=r.is_final, transcript=alt.transcript, confidence=alt.confidence,
            words=tuple(RawWord(w.word, _seconds(getattr(w, word_start)) or 0.0,
                                _seconds(getattr(w, word_end)) or 0.0, w.confidence, speaker(w))
                        for w in alt.words),
            end=_seconds(getattr(r, result_end)), language=r.language_code or None,
        ))
    return whole_hypothesis(results), event


def whole_hypothesis(results: list[RawResult]) -> list[RawResult]:
    """Finals as they are, then the response's interim parts (Google sends the stable start
    and the unstable rest as separate results) joined into one: Deepgram's interim Results
    carry the whole current hypothesis of the segment."""
    finals = [r for r in results if r.is_final]
    interim = [r for r in results if not r.is_final]
    if len(interim) <= 1:
        return finals + interim
    ends = [r.end for r in interim if r.end is not None]
    joined = RawResult(
        is_final=False,
        transcript=" ".join(t for r in interim if (t := r.transcript.strip())),
        confidence=min(r.confidence for r in interim),
        words=tuple(w for r in interim for w in r.words),
        end=max(ends) if ends else None,
        language=next((r.language for r in interim if r.language), None),
    )
    return [*finals, joined]


def _status_code(number: int) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code
    return grpc.StatusCode.UNKNOWN


__all__ = ["FATAL_ERRORS", "LIMIT_ERRORS", "RETRYABLE_ERRORS", "V1", "V2", "api_endpoint",
           "classify"]
