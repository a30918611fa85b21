"""A local Google Cloud Speech-to-Text service: v1 and v2 `StreamingRecognize` over `grpc.aio`.

It speaks the real protocol with the package's own message types, so the daemon reaches it with
the official client through `EDGE_STT_ENDPOINT` + `EDGE_STT_INSECURE`, the production code path.

The word code: a test's audio says which word is spoken in every sample. Sample magnitude
`id * CODE_STEP` (alternating sign: an 8 kHz square tone whose loudness names the word) is word
`id`; 0 is silence. The fake recognises each maximal run of one id as the word `w{id}`, with
offsets measured in the audio *this call* received (they restart at 0 on every call, as Google's
do). So a test that knows where it put each word on the session clock can check the client's
mapping exactly, across rotations, faults and replays. An utterance ends (a final result) after
`endpoint_s` of silence, or when the client half-closes the call.

The tone code (`FakeSpeech(word_code="tone")`) survives lossy codecs, which keep no sample
exact: word `id` is a sine at `(id + 1) * TONE_STEP_HZ`, silence is silence. The recogniser
reads each 10 ms window's loudest frequency (`tone_ids`) and runs the same word logic on it,
so word edges are known to a window (plus what a codec shifts them by).

Faults (set on `FakeSpeech.faults` at any time): `fail_at_requests` (abort with a status code when
the service-wide audio request count reaches N), `max_call_audio_s` (ABORTED like Google's 5-minute
limit), `response_delay_s` (slow responses), `down` (every request fails UNAVAILABLE: an outage),
`invalid_models` (INVALID_ARGUMENT at the config request).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import itertools
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from google.cloud import speech_v1, speech_v2

CODE_STEP = 8
TONE_STEP_HZ = 250
TONE_WINDOW = 160  # 10 ms at 16 kHz
TONE_FLOOR = 3000  # RMS (int16) under which a window is silence: above codec pre-echo
# and the smeared edge of a word (a tone at the default 0.3 amplitude has RMS ~6950)
SAMPLE_RATE = 16000
MAX_AUDIO_BYTES = 25600  # Google's per-request limit


# --- the word code ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ScriptWord:
    """A word placed on the session clock by a test: `w{id}` from sample `start` to `end`."""

    id: int
    start: int
    end: int

    @property
    def text(self) -> str:
        return f"w{self.id}"


def encode(segments: Iterable[tuple[int, float]]) -> tuple[bytes, list[ScriptWord]]:
    """Audio for `segments` of (word id or 0 for silence, seconds), and the words it holds."""
    parts: list[np.ndarray] = []
    words: list[ScriptWord] = []
    pos = 0
    for word_id, seconds in segments:
        n = round(seconds * SAMPLE_RATE)
        sign = np.where(np.arange(pos, pos + n) % 2 == 0, 1, -1)
        parts.append((sign * word_id * CODE_STEP).astype("<i2"))
        if word_id:
            if words and words[-1].id == word_id and words[-1].end == pos:
                raise ValueError("adjacent segments with one id would be one word")
            words.append(ScriptWord(word_id, pos, pos + n))
        pos += n
    return (np.concatenate(parts).tobytes() if parts else b""), words


def tone_encode(segments: Iterable[tuple[int, float]], rate: int, amplitude: float = 0.3
                ) -> tuple[np.ndarray, list[ScriptWord]]:
    """Tone-coded float32 mono audio at `rate` for `segments` of (word id or 0, seconds), and
    its words on the 16 kHz session clock. Segment lengths should be multiples of 10 ms."""
    parts: list[np.ndarray] = []
    words: list[ScriptWord] = []
    pos = 0  # 16 kHz samples
    for word_id, seconds in segments:
        n = round(seconds * rate)
        t = np.arange(n) / rate
        freq = (word_id + 1) * TONE_STEP_HZ
        parts.append((amplitude * np.sin(2 * np.pi * freq * t) if word_id else np.zeros(n))
                     .astype(np.float32))
        n16 = round(seconds * SAMPLE_RATE)
        if word_id:
            words.append(ScriptWord(word_id, pos, pos + n16))
        pos += n16
    return np.concatenate(parts), words


def tone_ids(pcm: np.ndarray) -> np.ndarray:
    """Word id per whole 10 ms window of 16 kHz int16 `pcm` (0: silence)."""
    windows = pcm[: len(pcm) // TONE_WINDOW * TONE_WINDOW].astype(np.float32)
    windows = windows.reshape(-1, TONE_WINDOW)
    loud = np.sqrt(np.mean(windows ** 2, axis=1)) >= TONE_FLOOR
    spectrum = np.abs(np.fft.rfft(windows * np.hanning(TONE_WINDOW), n=2048, axis=1))
    peak_hz = np.argmax(spectrum, axis=1) * SAMPLE_RATE / 2048
    ids = np.maximum(np.rint(peak_hz / TONE_STEP_HZ).astype(np.int32) - 1, 0)
    return np.where(loud, ids, 0)


def utterances(count: int, *, words: int = 4, word_s: float = 0.5, gap_s: float = 0.6,
               first_id: int = 1) -> list[tuple[int, float]]:
    """`count` utterances of `words` consecutive words, each followed by `gap_s` of silence."""
    segments: list[tuple[int, float]] = [(0, gap_s)]
    next_id = first_id
    for _ in range(count):
        for _ in range(words):
            segments.append((next_id, word_s))
            next_id += 1
        segments.append((0, gap_s))
    return segments


# --- the recogniser (one per call) -------------------------------------------------------------
@dataclass
class Out:
    """Something the recogniser says: a result (`words` as (id, start, end) call samples) or a
    voice-activity event (`event` = "begin" | "end" at sample `end`)."""

    is_final: bool = False
    words: list[tuple[int, int, int]] = field(default_factory=list)
    end: int = 0
    event: str | None = None


class Recognizer:
    """Turns word-coded audio into results, incrementally (numpy run-length, not per sample)."""

    def __init__(self, *, endpoint_s: float, interim: bool, vad: bool,
                 word_code: str = "exact") -> None:
        self.endpoint = round(endpoint_s * SAMPLE_RATE)
        self.word_code = word_code
        self._partial = np.zeros(0, np.int16)  # tone code: samples short of a whole window
        self.interim, self.vad = interim, vad
        self.pos = 0  # samples received
        self.run_id, self.run_start = 0, 0
        self.pending: list[tuple[int, int, int]] = []
        self.in_speech = False

    def feed(self, pcm: bytes) -> list[Out]:
        out: list[Out] = []
        if self.word_code == "tone":
            samples = np.concatenate([self._partial, np.frombuffer(pcm, dtype="<i2")])
            whole = len(samples) // TONE_WINDOW * TONE_WINDOW
            self._partial = samples[whole:]
            ids = np.repeat(tone_ids(samples[:whole]), TONE_WINDOW)
        else:
            ids = np.abs(np.frombuffer(pcm, dtype="<i2").astype(np.int32)) // CODE_STEP
        if not len(ids):
            return out
        cuts = [0, *(np.flatnonzero(np.diff(ids)) + 1).tolist(), len(ids)]
        for a, b in itertools.pairwise(cuts):
            value = int(ids[a])
            if value != self.run_id:
                self._close_run(self.pos + a, out)
                self.run_id, self.run_start = value, self.pos + a
                if value and not self.in_speech and self.vad:
                    out.append(Out(event="begin", end=self.pos + a))
                self.in_speech = self.in_speech or bool(value)
            if self.run_id == 0 and self.pending and self.pos + b - self.run_start >= self.endpoint:
                out += self._final(self.run_start + self.endpoint)
        self.pos += len(ids)
        return out

    def finish(self) -> list[Out]:
        """The client half-closed: everything pending becomes final."""
        out: list[Out] = []
        self._close_run(self.pos, out)
        self.run_id, self.run_start = 0, self.pos
        if self.pending:
            out += self._final(self.pos)
        return out

    def _close_run(self, at: int, out: list[Out]) -> None:
        if self.run_id and at > self.run_start:
            self.pending.append((self.run_id, self.run_start, at))
            if self.interim:
                out.append(Out(is_final=False, words=list(self.pending), end=at))

    def _final(self, end: int) -> list[Out]:
        out = [Out(is_final=True, words=self.pending, end=end)]
        self.pending = []
        if self.in_speech and self.vad:
            out.append(Out(event="end", end=end))
        self.in_speech = False
        return out


# --- the service -------------------------------------------------------------------------------
@dataclass
class Faults:
    fail_at_requests: dict[int, grpc.StatusCode] = field(default_factory=dict)
    max_call_audio_s: float | None = None
    response_delay_s: float = 0.0
    down: bool = False
    invalid_models: set[str] = field(default_factory=set)


@dataclass
class CallLog:
    """What one streaming call carried, for tests to check."""

    api: str
    config: Any = None
    requests: int = 0
    audio_bytes: int = 0
    max_request_bytes: int = 0
    opened: float = field(default_factory=time.monotonic)
    closed: float | None = None
    outcome: str = "open"

    @property
    def audio_s(self) -> float:
        return self.audio_bytes / 2 / SAMPLE_RATE


def _td(samples: int) -> datetime.timedelta:
    return datetime.timedelta(microseconds=samples * 1_000_000 / SAMPLE_RATE)


class FakeSpeech:
    """The fake service. `await start()` returns "127.0.0.1:PORT"; `await stop()` ends it."""

    def __init__(self, *, endpoint_s: float = 0.3, word_code: str = "exact") -> None:
        self.endpoint_s = endpoint_s
        self.word_code = word_code
        self.faults = Faults()
        self.calls: list[CallLog] = []
        self.audio_requests = 0  # service-wide, for `fail_at_requests`
        self._server: grpc.aio.Server | None = None

    async def start(self) -> str:
        server = grpc.aio.server()
        for api, types in (("v2", speech_v2), ("v1", speech_v1)):
            handler = grpc.stream_stream_rpc_method_handler(
                self._handler(api),
                request_deserializer=types.StreamingRecognizeRequest.deserialize,
                response_serializer=types.StreamingRecognizeResponse.serialize,
            )
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
                f"google.cloud.speech.{api}.Speech", {"StreamingRecognize": handler}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._server = server
        return f"127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=None)

    def _handler(self, api: str) -> Any:
        async def handle(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
                         ) -> AsyncIterator[Any]:
            log = CallLog(api)
            self.calls.append(log)
            try:
                async for response in self._serve(api, log, requests, context):
                    if self.faults.response_delay_s:
                        await asyncio.sleep(self.faults.response_delay_s)
                    yield response
                log.outcome = "ok"
            except asyncio.CancelledError:
                log.outcome = "cancelled"
                raise
            except Exception:
                if log.outcome == "open":
                    log.outcome = "error"
                raise
            finally:
                if log.outcome == "open":  # closed by grpc (GeneratorExit): the client left
                    log.outcome = "cancelled"
                log.closed = time.monotonic()
        return handle

    async def _serve(self, api: str, log: CallLog, requests: AsyncIterator[Any],
                     context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async def abort(code: grpc.StatusCode, details: str) -> None:
            log.outcome = code.name
            await context.abort(code, details)

        first = await anext(aiter(requests), None)
        if first is None or "streaming_config" not in first:
            await abort(grpc.StatusCode.INVALID_ARGUMENT, "first request must carry streaming_config")
        log.config = first.streaming_config
        if self.faults.down:
            await abort(grpc.StatusCode.UNAVAILABLE, "The service is currently unavailable.")
        model = log.config.config.model
        if model in self.faults.invalid_models:
            await abort(grpc.StatusCode.INVALID_ARGUMENT, f"The model {model!r} does not exist.")
        shape = _V2 if api == "v2" else _V1
        shape_config = shape.read_config(log.config)
        rec = Recognizer(endpoint_s=self.endpoint_s, interim=shape_config["interim"],
                         vad=shape_config["vad"], word_code=self.word_code)
        said: list[tuple[int, int, int]] = []  # v1 with diarization repeats every word said
        async for req in requests:
            audio = req.audio if api == "v2" else req.audio_content
            log.requests += 1
            log.audio_bytes += len(audio)
            log.max_request_bytes = max(log.max_request_bytes, len(audio))
            self.audio_requests += 1
            code = self.faults.fail_at_requests.pop(self.audio_requests, None)
            if self.faults.down:
                code = grpc.StatusCode.UNAVAILABLE
            if code is not None:
                await abort(code, "The service is currently unavailable."
                            if code == grpc.StatusCode.UNAVAILABLE else f"injected {code.name}")
            if len(audio) > MAX_AUDIO_BYTES:
                await abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"Audio chunk can be of a maximum of {MAX_AUDIO_BYTES} bytes")
            limit = self.faults.max_call_audio_s
            if limit is not None and log.audio_s > limit:
                await abort(grpc.StatusCode.ABORTED, "Max duration of 5 minutes reached for stream.")
            for out in rec.feed(audio):
                yield shape.response(out, shape_config, said)
        for out in rec.finish():
            yield shape.response(out, shape_config, said)


def _word_text(word_id: int, last: bool, punctuate: bool) -> str:
    return f"w{word_id}" + ("." if last and punctuate else "")


class _V2:
    @staticmethod
    def read_config(cfg: Any) -> dict[str, Any]:
        features = cfg.config.features
        return {
            "interim": cfg.streaming_features.interim_results,
            "vad": cfg.streaming_features.enable_voice_activity_events,
            "diarize": "diarization_config" in features,
            "punctuate": features.enable_automatic_punctuation,
            "offsets": features.enable_word_time_offsets,
            "language": (list(cfg.config.language_codes) or ["en-US"])[0],
        }

    @staticmethod
    def response(out: Out, c: dict[str, Any], said: list[tuple[int, int, int]]) -> Any:
        m = speech_v2
        if out.event is not None:
            types = m.StreamingRecognizeResponse.SpeechEventType
            kind = types.SPEECH_ACTIVITY_BEGIN if out.event == "begin" else types.SPEECH_ACTIVITY_END
            return m.StreamingRecognizeResponse(speech_event_type=kind, speech_event_offset=_td(out.end))
        words = [
            m.WordInfo(
                start_offset=_td(s), end_offset=_td(e), confidence=0.5 + (i % 50) / 100,
                word=_word_text(i, n == len(out.words) - 1 and out.is_final, c["punctuate"]),
                speaker_label=str(i % 3 + 1) if c["diarize"] else "",
            )
            for n, (i, s, e) in enumerate(out.words)
        ]
        # Google's interim responses carry the hypothesis in parts: the stable start
        # (stability ~0.9) and the unstable rest (~0.1), each its own result.
        parts = [words] if out.is_final or len(words) < 2 else [words[:-1], words[-1:]]
        results = [m.StreamingRecognitionResult(
            alternatives=[m.SpeechRecognitionAlternative(
                transcript=" ".join(w.word for w in part), confidence=0.9 if out.is_final else 0.0,
                words=part if c["offsets"] else [])],
            is_final=out.is_final,
            stability=0.0 if out.is_final else (0.9 if n == 0 and len(parts) > 1 else 0.1),
            result_end_offset=_td(out.end),
            language_code="en-us" if c["language"] == "auto" else c["language"].lower(),
        ) for n, part in enumerate(parts)]
        return m.StreamingRecognizeResponse(results=results)


class _V1:
    @staticmethod
    def read_config(cfg: Any) -> dict[str, Any]:
        return {
            "interim": cfg.interim_results,
            "vad": cfg.enable_voice_activity_events,
            "diarize": cfg.config.diarization_config.enable_speaker_diarization,
            "punctuate": cfg.config.enable_automatic_punctuation,
            "offsets": cfg.config.enable_word_time_offsets,
            "language": cfg.config.language_code,
        }

    @staticmethod
    def response(out: Out, c: dict[str, Any], said: list[tuple[int, int, int]]) -> Any:
        m = speech_v1
        if out.event is not None:
            types = m.StreamingRecognizeResponse.SpeechEventType
            kind = types.SPEECH_ACTIVITY_BEGIN if out.event == "begin" else types.SPEECH_ACTIVITY_END
            return m.StreamingRecognizeResponse(speech_event_type=kind, speech_event_time=_td(out.end))
        transcript = " ".join(
            _word_text(i, n == len(out.words) - 1 and out.is_final, c["punctuate"])
            for n, (i, _, _) in enumerate(out.words))
        shown = out.words
        if out.is_final and c["diarize"]:
            # v1's documented habit: with diarization the top alternative of a final carries
            # every word since the start of the call, each with its speaker tag.
            said.extend(out.words)
            shown = list(said)
        words = [
            m.WordInfo(start_time=_td(s), end_time=_td(e), word=f"w{i}", confidence=0.5 + (i % 50) / 100,
                       speaker_tag=i % 3 + 1 if c["diarize"] and out.is_final else 0)
            for i, s, e in shown
        ]
        result = m.StreamingRecognitionResult(
            alternatives=[m.SpeechRecognitionAlternative(
                transcript=transcript, confidence=0.9 if out.is_final else 0.0,
                words=words if c["offsets"] else [])],
            is_final=out.is_final, stability=0.0 if out.is_final else 0.8,
            result_end_time=_td(out.end), language_code=c["language"].lower(),
        )
        return m.StreamingRecognizeResponse(results=[result])


@contextlib.asynccontextmanager
async def fake_speech(**kwargs: Any) -> AsyncIterator[tuple[FakeSpeech, str]]:
    """A running `FakeSpeech` and its "host:port", stopped on exit."""
    fake = FakeSpeech(**kwargs)
    endpoint = await fake.start()
    try:
        yield fake, endpoint
    finally:
        await fake.stop()


__all__ = ["CODE_STEP", "FakeSpeech", "Faults", "Recognizer", "ScriptWord", "encode", "fake_speech",
           "tone_encode", "tone_ids",
           "utterances"]


async def _serve_forever(endpoint_s: float, word_code: str) -> None:
    fake = FakeSpeech(endpoint_s=endpoint_s, word_code=word_code)
    print(await fake.start(), flush=True)  # the benchmark reads "host:port" from this line
    try:
        await asyncio.Event().wait()
    finally:
        await fake.stop()


if __name__ == "__main__":  # python -m tests.fakes.google_speech: a standalone fake for benchmarks
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m tests.fakes.google_speech",
        description="Serve the fake Google Speech service (v1 and v2) on 127.0.0.1 and print "
                    "its host:port; point the daemon at it with EDGE_STT_ENDPOINT and "
                    "EDGE_STT_INSECURE=true.")
    parser.add_argument("endpoint_s", nargs="?", type=float, default=0.3,
                        help="silence after a word that ends an utterance (default 0.3 s)")
    parser.add_argument("--word-code", choices=["exact", "tone"], default="exact",
                        help="exact sample magnitudes (default) or tones (for lossy codecs)")
    cli = parser.parse_args()
    asyncio.run(_serve_forever(cli.endpoint_s, cli.word_code))
