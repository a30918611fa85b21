"""The Google upstream against the local fake service, through the official async client.

The upstream is built by `create_upstream()` from settings with EDGE_STT_ENDPOINT +
EDGE_STT_INSECURE, the production code path but for the channel. The audio is word-coded
(tests/fakes/google_speech.py), so the fake's word offsets come from the audio each call got,
and every test checks the words it gets back against where it put them on the session clock.
Audio is fed faster than real time; rotation follows the audio time each call was sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from edge.clock import SAMPLE_RATE, AudioBlock
from edge.health import Status
from edge.metrics import Metrics
from edge.plan import plan_session
from edge.protocol import ListenParams
from edge.settings import load_settings
from edge.stt.base import StreamConfig, TranscriptEvent
from edge.stt.google import GoogleUpstream, create_upstream
from edge.stt.policy import Backoff
from edge.stt.stream import RunParams
from tests.fakes.google_speech import FakeSpeech, ScriptWord, encode, fake_speech, utterances
from tests.helpers.upstream import FLUSH, AudioItem, drive

FAST = Backoff(initial=0.01, maximum=0.05)
V2 = StreamConfig(language="auto", model="chirp_3", interim_results=True)


@dataclass
class Google:
    fake: FakeSpeech
    upstream: GoogleUpstream
    status: Status
    metrics: Metrics

    def counter(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels or None)
        return value or 0.0


@contextlib.asynccontextmanager
async def google(**overrides: Any) -> AsyncIterator[Google]:
    """The fake service and an upstream for it, from settings (EDGE_STT_* as field names)."""
    async with fake_speech() as (fake, endpoint):
        settings = load_settings(edge_stt_endpoint=endpoint, edge_stt_insecure=True, **overrides)
        status, metrics = Status(max_sessions=4), Metrics()
        upstream = await create_upstream(settings, status, metrics, backoff=FAST)
        assert upstream is not None and status.checks["upstream"] == "ok"
        try:
            yield Google(fake, upstream, status, metrics)
        finally:
            await upstream.close()


@dataclass
class Session:
    """Collects one stream's events; `progress` is the end of the last final (seconds)."""

    events: list[TranscriptEvent] = field(default_factory=list)
    progress: float = 0.0
    interim_leaks: list[TranscriptEvent] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def reach(self, seconds: float) -> None:
        """Wait until the finals cover the session up to `seconds`."""
        while self.progress < seconds:
            await self._changed.wait()

    @property
    def finals(self) -> list[TranscriptEvent]:
        return [e for e in self.events if e.kind == "result" and e.is_final]

    @property
    def words(self) -> list[Any]:
        return [w for e in self.finals for w in e.words]

    @property
    def errors(self) -> list[TranscriptEvent]:
        return [e for e in self.events if e.kind == "error"]

    async def run(self, upstream: GoogleUpstream, audio: AsyncIterator[AudioItem],
                  config: StreamConfig = V2) -> Session:
        """One run: `audio` pushed into it as a channel would (its own task), events collected
        until the run ends. A failure in the `audio` script is raised here."""
        run = upstream.open_run(config)
        driver = asyncio.create_task(drive(run, audio))
        try:
            async for event in run.events():
                self.events.append(event)
                if event.kind == "result" and event.is_final:
                    self.progress = max(self.progress, event.end)
                    self._changed.set()
                    self._changed = asyncio.Event()
                elif event.kind == "result" and any(w.end <= self.progress for w in event.words):
                    self.interim_leaks.append(event)
        finally:
            driver.cancel()  # a source that outlives the run (a fatal error) stops here
            with contextlib.suppress(asyncio.CancelledError):
                await driver
        return self


async def feed(pcm: bytes, session: Session | None = None, *, sizes: Iterable[int] = (1600,),
               lead_s: float = 8.0, speed: float | None = None, start: int = 0,
               end: int | None = None, flush_at: Iterable[int] = ()) -> AsyncIterator[AudioItem]:
    """`pcm[start:end]` (samples) as blocks of `sizes` samples (cycled), faster than real time:
    at most `lead_s` ahead of the `session`'s finals (a live source with a fast upstream),
    and/or at `speed` times real time."""
    sizes, flushes = list(sizes), sorted(flush_at)
    pos, end, i = start, len(pcm) // 2 if end is None else end, 0
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    while pos < end:
        n = min(sizes[i % len(sizes)], end - pos, *(f - pos for f in flushes if f > pos))
        if session is not None:
            await session.reach((pos + n) / SAMPLE_RATE - lead_s)
        if speed is not None:
            await asyncio.sleep(max(0.0, t0 + (pos - start) / SAMPLE_RATE / speed - loop.time()))
        yield AudioBlock(pos, pcm[pos * 2:(pos + n) * 2])
        pos, i = pos + n, i + 1
        while flushes and flushes[0] <= pos:
            flushes.pop(0)
            yield FLUSH
        await asyncio.sleep(0)


async def eventually(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.005)):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not met in time")


def assert_exact(got: list[Any], expected: list[ScriptWord]) -> None:
    """Every expected word once, in order, exactly where the script put it."""
    assert [w.word for w in got] == [w.text for w in expected]
    assert [(w.start, w.end) for w in got] == [
        (w.start / SAMPLE_RATE, w.end / SAMPLE_RATE) for w in expected]
    for a, b in itertools.pairwise(got):
        assert a.end <= b.start  # the clock never goes backwards


async def test_twelve_minutes_with_rotations_and_faults_lose_and_repeat_nothing() -> None:
    pcm, script = encode(utterances(277, words=4, word_s=0.5, gap_s=0.6))  # 12 min
    assert len(pcm) / 2 / SAMPLE_RATE > 12 * 60
    async with google(edge_stt_rotate_s=60, edge_stt_replay_s=30) as g:
        faults = {1500: grpc.StatusCode.UNAVAILABLE, 3500: grpc.StatusCode.UNAVAILABLE,
                  5500: grpc.StatusCode.UNAVAILABLE}
        g.fake.faults.fail_at_requests = dict(faults)
        s = Session()
        # Blocks of 50 ms to 1 s: requests must still be ~100 ms and never over 25 KB.
        await asyncio.wait_for(
            s.run(g.upstream, feed(pcm, s, sizes=[1600, 4800, 800, 16000])), 120)

    assert_exact(s.words, script)
    assert not s.errors and not s.interim_leaks
    assert not g.fake.faults.fail_at_requests  # all three faults happened...
    failed = [c for c in g.fake.calls if c.outcome == "UNAVAILABLE"]
    assert len(failed) == len(faults)  # ...each cost one call, and the upstream reconnected
    # The grpc.aio client reports a server abort that races its own write as INTERNAL
    # ("Failed execute_batch"); both are retryable.
    assert g.counter("edge_upstream_errors_total", error="ServiceUnavailable") + g.counter(
        "edge_upstream_errors_total", error="InternalServerError") == len(faults)
    assert g.counter("edge_upstream_restarts_total", cause="error") == len(faults)
    # Rotation every 60 s of audio: no call ever carried more, and there were 12+ of them.
    assert max(c.audio_s for c in g.fake.calls) <= 60
    assert g.counter("edge_upstream_restarts_total", cause="rotate") >= 11
    assert max(c.max_request_bytes for c in g.fake.calls) == 3200
    assert g.status.checks["upstream"] == "ok"


async def test_v1_with_diarization_deduplicates_repeated_words_and_labels_speakers() -> None:
    pcm, script = encode(utterances(60, words=3, word_s=0.4, gap_s=0.5))  # ~2.5 min
    async with google(edge_stt_api="v1", edge_stt_language="en-US", edge_stt_rotate_s=30) as g:
        g.fake.faults.fail_at_requests = {700: grpc.StatusCode.UNAVAILABLE}
        config = StreamConfig(language="en-US", model="latest_long", diarize=True)
        assert g.upstream.capabilities(config.model, config.language).diarization
        s = Session()
        await asyncio.wait_for(s.run(g.upstream, feed(pcm, s), config), 60)
    assert_exact(s.words, script)
    # Google's speaker tags come through, per word (the fake tags word i as i % 3 + 1).
    assert [w.speaker_label for w in s.words] == [str(w.id % 3 + 1) for w in script]
    first = g.fake.calls[0]
    assert first.api == "v1" and first.config.config.diarization_config.enable_speaker_diarization
    assert any(c.outcome == "UNAVAILABLE" for c in g.fake.calls) and len(g.fake.calls) >= 5
    assert not s.errors


@pytest.mark.parametrize("mode", ["auto", "google"])
async def test_v2_diarizes_only_when_forced(mode: str) -> None:
    pcm, script = encode(utterances(8))
    async with google(edge_stt_diarization=mode) as g:
        # The session plan decides whether Google is asked (edge/plan.py).
        plan = plan_session(ListenParams(diarize=True), load_settings(edge_stt_diarization=mode),
                            g.upstream.capabilities)
        assert plan.upstream is not None
        s = Session()
        await asyncio.wait_for(s.run(g.upstream, feed(pcm, s), plan.upstream), 30)
    assert_exact(s.words, script)
    features = g.fake.calls[0].config.config.features
    if mode == "google":
        assert features.diarization_config.max_speaker_count == V2.max_speakers
        assert [w.speaker_label for w in s.words] == [str(w.id % 3 + 1) for w in script]
    else:  # chirp_3 with language auto: Google cannot, so it is not asked to
        assert "diarization_config" not in features
        assert all(w.speaker_label is None for w in s.words)


async def test_outage_longer_than_the_replay_buffer_is_reported_and_later_audio_transcribed(
) -> None:
    # Period 2.5 s (4 words of 0.5 s, 0.5 s of silence): silence at [2.5k, 2.5k + 0.5).
    pcm, script = encode(utterances(24, words=4, word_s=0.5, gap_s=0.5))
    replay_s, p1, p2 = 5.0, 20.4, 45.4  # outage from p1 to p2 (session seconds), in silence
    a, b = round(p1 * SAMPLE_RATE), round(p2 * SAMPLE_RATE)
    async with google(edge_stt_rotate_s=60, edge_stt_replay_s=replay_s) as g:
        s = Session()

        async def audio() -> AsyncIterator[AudioItem]:
            async for item in feed(pcm, s, lead_s=3, end=a):
                yield item
            await s.reach(max(w.end for w in script if w.end < a) / SAMPLE_RATE)
            g.fake.faults.down = True
            async for item in feed(pcm, start=a, end=b):  # the outage: nothing gets through
                yield item
            await eventually(lambda: sum(c.outcome == "UNAVAILABLE" for c in g.fake.calls) >= 3)
            assert g.status.checks["upstream"].startswith("degraded: 1 stream(s) reconnecting")
            g.fake.faults.down = False
            async for item in feed(pcm, s, lead_s=3, start=b):
                yield item

        await asyncio.wait_for(s.run(g.upstream, audio()), 60)

    before = [w for w in script if w.end < a]
    delivered_until = max(e.end for e in s.finals if e.end <= p1)  # where the transcript stood
    # Told as it is found out (increments: audio skipped while the call still looked alive,
    # then what the failed call had been sent), adding up to the whole gap.
    assert s.errors and not any(e.fatal for e in s.errors)
    for e in s.errors:
        assert f"{e.lost_s:.1f} s of audio not transcribed" in (e.message or "")
    lost = sum(e.lost_s for e in s.errors)
    assert lost == pytest.approx(p2 - replay_s - delivered_until, abs=1e-6)
    after = [w for w in script if w.start >= b - replay_s * SAMPLE_RATE]
    assert_exact(s.words, before + after)
    assert g.counter("edge_upstream_lost_audio_seconds_total") == pytest.approx(lost)
    assert any("not transcribed" in n["message"] for n in g.status.snapshot()["notices"])
    assert g.status.checks["upstream"] == "ok"  # recovered


async def test_forced_rotation_in_long_silence_is_graceful() -> None:
    # No final comes in the quiet window (silence): the call is half-closed at the limit,
    # Google answers for all it got, and nothing is replayed or reported lost even though the
    # silence is longer than the replay buffer.
    segments = [*utterances(3), (0, 25.0), *utterances(3, first_id=100)]
    pcm, script = encode(segments)
    async with google(edge_stt_rotate_s=10, edge_stt_replay_s=5) as g:
        s = Session()
        await asyncio.wait_for(s.run(g.upstream, feed(pcm, speed=50)), 30)
    assert_exact(s.words, script)
    assert not s.errors
    assert max(c.audio_s for c in g.fake.calls) <= 10
    # Calls that reached the limit in the long silence were half-closed and answered...
    assert sum(c.audio_s == 10 and c.outcome == "ok" for c in g.fake.calls) >= 2
    # ...so the silence was sent once: only short unfinalized tails were replayed.
    total = len(pcm) / 2 / SAMPLE_RATE
    assert total <= sum(c.audio_s for c in g.fake.calls) < total + 5


async def test_a_stalled_stream_still_rotates_on_wall_time() -> None:
    pcm, script = encode(utterances(2, words=2, word_s=0.3, gap_s=0.5))
    half = script[1].end + SAMPLE_RATE // 2
    async with fake_speech() as (fake, endpoint):
        from edge.stt.google_api import V2 as V2Api

        upstream = GoogleUpstream(V2Api("p", "us"), endpoint=endpoint, insecure=True,
                                  params=RunParams(rotate_s=3.0, backoff=FAST))
        s = Session()

        async def audio() -> AsyncIterator[AudioItem]:
            async for item in feed(pcm, end=half):
                yield item
            await asyncio.sleep(3.5)  # the device goes quiet (KeepAlive only)
            async for item in feed(pcm, start=half):
                yield item

        await asyncio.wait_for(s.run(upstream, audio()), 10)
        await upstream.close()
    assert_exact(s.words, script)
    first = fake.calls[0]
    assert first.outcome in ("ok", "cancelled") and first.closed is not None
    assert 2.9 < first.closed - first.opened < 3.5  # ended by the wall clock, not by audio
    assert first.audio_s < 2.0 and len(fake.calls) == 2


async def test_google_duration_limit_reconnects_at_once_and_replays() -> None:
    pcm, script = encode(utterances(40))
    async with google(edge_stt_rotate_s=290) as g:
        g.fake.faults.max_call_audio_s = 15  # Google's limit comes first
        s = Session()
        # Paced (30x real time) so the service's status rarely races a write (see below).
        await asyncio.wait_for(s.run(g.upstream, feed(pcm, s, speed=30)), 30)
    assert_exact(s.words, script)
    assert not s.errors
    aborted = sum(c.outcome == "ABORTED" for c in g.fake.calls)
    assert aborted >= 5
    # As a limit, ABORTED reconnects at once. A status that races the client's own write
    # reaches it as INTERNAL (grpc/grpc#36066): a retryable error, also replayed. On a loaded
    # machine every abort may race, so only the total is exact here; that ABORTED means
    # "limit" is checked without the race in test_stt_google.py (classify).
    assert g.counter("edge_upstream_restarts_total", cause="limit") + g.counter(
        "edge_upstream_restarts_total", cause="error") == aborted
    assert g.status.checks["upstream"] == "ok"


async def test_slow_responses_still_deliver_every_word_once() -> None:
    pcm, script = encode(utterances(25))
    async with google(edge_stt_rotate_s=20) as g:
        g.fake.faults.response_delay_s = 0.02
        s = Session()
        await asyncio.wait_for(s.run(g.upstream, feed(pcm, s, lead_s=4)), 60)
    assert_exact(s.words, script)
    assert len(g.fake.calls) >= 3


async def test_invalid_argument_ends_only_that_session() -> None:
    pcm, script = encode(utterances(10))
    async with google(edge_stt_rotate_s=60) as g:
        g.fake.faults.invalid_models = {"no-such-model"}

        async def endless() -> AsyncIterator[AudioItem]:
            pos = 0
            while True:  # the session keeps sending: the upstream must end by itself
                yield AudioBlock(pos, bytes(3200))
                pos += 1600
                await asyncio.sleep(0.01)

        bad, good = Session(), Session()
        await asyncio.wait_for(asyncio.gather(
            bad.run(g.upstream, endless(), StreamConfig(language="auto", model="no-such-model")),
            good.run(g.upstream, feed(pcm, good))), 30)
    [err] = bad.events
    assert err.kind == "error" and err.fatal and "InvalidArgument" in (err.message or "")
    assert "no-such-model" in (err.message or "")
    assert_exact(good.words, script)
    assert g.counter("edge_upstream_errors_total", error="InvalidArgument") == 1
    assert any("ended by InvalidArgument" in n["message"] for n in g.status.snapshot()["notices"])


async def test_a_refused_config_is_fatal_even_when_its_status_races_the_audio() -> None:
    # 20 s of audio waits in the buffer when the call opens, so the audio goes out back to back
    # and the service's INVALID_ARGUMENT can reach the client as INTERNAL (grpc/grpc#36066).
    # After two such failures the next attempt holds its audio back until the config has been
    # answered.
    pcm, _ = encode(utterances(8))
    async with google() as g:
        g.fake.faults.invalid_models = {"no-such-model"}

        async def burst_then_wait() -> AsyncIterator[AudioItem]:
            async for item in feed(pcm, lead_s=1000):
                yield item
            await asyncio.sleep(30)

        for _ in range(3):
            s = Session()
            before = len(g.fake.calls)
            await asyncio.wait_for(s.run(g.upstream, burst_then_wait(),
                                         StreamConfig(language="auto", model="no-such-model")), 10)
            [err] = s.events
            assert err.fatal and "InvalidArgument" in (err.message or "")
            # At most two attempts lose the race; the third is answered before any audio.
            assert len(g.fake.calls) - before <= 3


async def test_flush_finalizes_what_was_sent_then_says_flushed() -> None:
    pcm, script = encode(utterances(6))
    mid = script[9].end  # between two words of the third utterance: no silence yet
    async with google() as g:
        s = Session()
        await asyncio.wait_for(s.run(g.upstream, feed(pcm, s, flush_at=[mid, mid])), 30)
    assert_exact(s.words, script)
    kinds = [e.kind for e in s.events if e.kind != "result" or e.is_final]
    first = kinds.index("flushed")
    assert kinds[first:first + 2] == ["flushed", "flushed"]  # one answer per FLUSH
    before = [w for e in s.finals[:first] for w in e.words]
    assert [w.word for w in before] == [w.text for w in script[:10]]  # all up to the FLUSH
    assert s.events[[e.kind for e in s.events].index("flushed")].start == mid / SAMPLE_RATE
    assert g.fake.calls[0].outcome == "ok"  # half-closed, not cut


async def test_a_flush_covers_exactly_the_audio_pushed_before_it() -> None:
    # The whole session is pushed before the run's calls start: audio, flush, audio, end. The
    # order of the pushes alone decides what the flush covers (no task in between to reorder).
    pcm, script = encode(utterances(6))
    mid = script[9].end  # between two words of the third utterance
    async with google() as g:
        run = g.upstream.open_run(V2)
        run.push(AudioBlock(0, pcm[:mid * 2]))
        run.flush()
        run.push(AudioBlock(mid, pcm[mid * 2:]))
        run.end()
        events = [e async for e in run.events()]
    [flushed] = [i for i, e in enumerate(events) if e.kind == "flushed"]
    assert events[flushed].start == mid / SAMPLE_RATE
    finals = [e for e in events if e.kind == "result" and e.is_final]
    before = [w for e in events[:flushed] if e.kind == "result" and e.is_final for w in e.words]
    assert_exact(before, script[:10])  # every word before the flush, and none after it
    assert_exact([w for e in finals for w in e.words], script)
    assert g.fake.calls[0].outcome == "ok" and g.fake.calls[0].audio_s == mid / SAMPLE_RATE


async def test_the_replay_buffer_is_the_one_bound_on_pushed_audio() -> None:
    # 20.5 s pushed at once, before any call could take it, with a 5 s replay buffer: the run
    # holds the newest 5 s (no other queue holds more), reports the 15.5 s it dropped as lost,
    # and transcribes the rest exactly (the bound falls on a word start: 0.5 s + 6 x 2.5 s).
    replay_s = 5.0
    pcm, script = encode(utterances(8, gap_s=0.5))
    total_s = len(pcm) / 2 / SAMPLE_RATE
    async with google(edge_stt_replay_s=replay_s) as g:
        run = g.upstream.open_run(V2)
        for pos in range(0, len(pcm) // 2, 1600):
            run.push(AudioBlock(pos, pcm[pos * 2:(pos + 1600) * 2]))
        assert run.buffer.retained_s == replay_s
        run.end()
        events = [e async for e in run.events()]
    [lost] = [e for e in events if e.kind == "error"]
    assert not lost.fatal and lost.lost_s == pytest.approx(total_s - replay_s)
    assert g.counter("edge_upstream_lost_audio_seconds_total") == pytest.approx(total_s - replay_s)
    kept = [w for w in script if w.start >= (total_s - replay_s) * SAMPLE_RATE]
    assert len(kept) == 8
    assert_exact([w for e in events if e.kind == "result" and e.is_final for w in e.words], kept)


async def test_flush_with_nothing_pending_answers_at_once_and_the_end_drains() -> None:
    pcm, script = encode(utterances(2, gap_s=0.6)[:-1])  # ends mid-utterance: no final silence
    async with google() as g:
        s = Session()

        async def audio() -> AsyncIterator[AudioItem]:
            yield FLUSH  # before any audio
            async for item in feed(pcm):
                yield item

        await asyncio.wait_for(s.run(g.upstream, audio()), 10)
    assert s.events[0].kind == "flushed" and s.events[0].start == 0
    assert_exact(s.words, script)  # the last words came out when the audio ended


async def test_voice_activity_events_are_mapped_and_not_repeated() -> None:
    pcm, script = encode(utterances(30))
    async with google(edge_stt_rotate_s=20) as g:
        g.fake.faults.fail_at_requests = {400: grpc.StatusCode.UNAVAILABLE}
        s = Session()
        config = StreamConfig(language="auto", model="chirp_3", vad_events=True)
        await asyncio.wait_for(s.run(g.upstream, feed(pcm, s), config), 30)
    assert g.fake.calls[0].config.streaming_features.enable_voice_activity_events
    started = [e.start for e in s.events if e.kind == "speech_started"]
    kinds = [e.kind for e in s.events if e.kind.startswith("speech_")]
    assert all(a != b for a, b in itertools.pairwise(kinds))  # they alternate
    assert started == [script[i].start / SAMPLE_RATE for i in range(0, len(script), 4)]


async def test_v1_with_language_auto_is_a_clear_fatal_error() -> None:
    async with google(edge_stt_api="v1", edge_stt_language="en-US") as g:
        s = Session()
        await asyncio.wait_for(s.run(
            g.upstream, feed(bytes(32000)), StreamConfig(language="auto", model="latest_long")), 10)
    [err] = s.events
    assert err.fatal and "v2" in (err.message or "") and not g.fake.calls


async def test_closing_the_stream_early_cancels_the_call() -> None:
    pcm, _ = encode(utterances(20))
    async with google() as g:
        run = g.upstream.open_run(V2)
        driver = asyncio.create_task(drive(run, feed(pcm)))
        events = run.events()
        async for event in events:
            if event.kind == "result" and event.is_final:
                break
        await events.aclose()  # type: ignore[attr-defined]
        driver.cancel()
        await eventually(lambda: g.fake.calls[-1].outcome != "open")
    assert g.fake.calls[-1].outcome == "cancelled"


async def test_a_finalize_flood_is_coalesced_into_few_calls_and_each_is_answered() -> None:
    # A FLUSH after every 10 ms block: each one used to half-close a call of its own.
    pcm, script = encode(utterances(4))
    n = len(pcm) // 2
    every = list(range(160, n, 160))
    async with google() as g:
        s = Session()
        await asyncio.wait_for(s.run(g.upstream, feed(pcm, s, sizes=(160,), flush_at=every)), 60)
    # A FLUSH inside a word splits it across two calls (both halves come back): every word is
    # there, in order, none lost.
    heard = [w.word for w in s.words]
    assert [t for i, t in enumerate(heard) if i == 0 or t != heard[i - 1]] == [
        w.text for w in script]
    assert sum(e.kind == "flushed" for e in s.events) == len(every)  # one answer per FLUSH
    assert len(g.fake.calls) <= 60, f"{len(g.fake.calls)} calls for {len(every)} FLUSHes"
