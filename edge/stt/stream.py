"""One upstream run: Google calls opened, rotated and reconnected around a replay buffer.

A `StreamRun` is the upstream's `open_run()` for one session channel (the `UpstreamRun`
contract, edge/stt/base.py). Three parts, one loop:

- the channel's `push()` puts the audio straight into the `ReplayBuffer`, in the task that
  received it: the run's one bound on audio Google has not finalized (EDGE_STT_REPLAY_S, the
  oldest dropped, what that loses reported at the next call boundary; see replay.py).
  `flush()` and `end()` are marked at the buffer's end at once: their order with the audio holds;
- the *supervisor* opens one streaming call at a time; each call's request generator sends the
  buffer's audio in ~100 ms requests (never above Google's 25 KB) from the call's start cursor;
  its reader maps results onto the session clock (`Transcript`);
- events go to the session through a bounded queue (`OUT_QUEUE`, read by `events()`); when it
  is full the reader waits (backpressure onto Google's stream, never onto the audio).

How a call ends (`policy.CallEnd`) decides where the next one starts; `policy.RetryPolicy`
decides when, and why (the failures in a row, backoff, probing, giving up):
- *clean* (we half-closed, Google answered everything): all audio it was sent is covered; the
  next call starts where it stopped. Used for FLUSH, for the end of the audio, and for a forced
  rotation when replaying would not be whole (long silence, mostly: see `_rotate_now`).
- *cut* (rotation: at a quiet moment, right after a final past `rotate_s - quiet_s`, or forced
  at `rotate_s`; or a drain that takes too long) and *failed* (`limit`, `retry`, `unclear`):
  the next call replays the unfinalized audio from `delivered_until`, so the utterance in progress is
  heard whole; `fatal` ends this session's upstream with an `error` event (fatal=True).

Rotation clock: a call's age is max(audio it was sent, wall time it has been open)
(`RotationPolicy`). Live, audio arrives in real time and the two agree; a stalled session
still rotates on wall time (Google's limit is wall time); audio fed faster than real time
(replays, tests) rotates on audio time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from edge.clock import SAMPLE_RATE, AudioBlock, OffsetMap
from edge.stt.base import StreamConfig, TranscriptEvent
from edge.stt.policy import (
    ROTATE,
    Backoff,
    CallEnd,
    CallState,
    Outcome,
    PendingFlushes,
    RetryPolicy,
    RotationPolicy,
    check_transition,
)
from edge.stt.replay import RawResult, RawSpeechEvent, ReplayBuffer, Transcript

log = logging.getLogger("edge.stt")

OUT_QUEUE = 64  # events waiting for the session; full -> the call's reader waits
REQUEST_SAMPLES = SAMPLE_RATE // 10  # 100 ms = 3200 bytes per request (Google's limit: 25 KB)


class Api(Protocol):
    """What the run needs from an API shape (`edge.stt.google_api.V1`/`V2`)."""

    name: str

    def client(self, *, endpoint: str, insecure: bool, credentials: Any) -> Any: ...

    def config_request(self, config: StreamConfig, *, diarize: bool) -> Any: ...

    def audio_request(self, pcm: bytes) -> Any: ...

    def parse(self, response: Any) -> tuple[list[RawResult], RawSpeechEvent | None]: ...

    def classify(self, exc: BaseException) -> str: ...


class Hooks:
    """Where a run reports to the daemon (metrics, status). The base class ignores it all."""

    def call_opened(self, run_id: int, cause: str | None) -> None: ...

    def call_healthy(self, run_id: int) -> None: ...

    def call_failed(self, run_id: int, exc: BaseException | str, kind: str) -> None: ...

    def audio_lost(self, run_id: int, seconds: float) -> None: ...

    def run_ended(self, run_id: int) -> None: ...


@dataclass(frozen=True)
class RunParams:
    rotate_s: float = 290.0
    replay_s: float = 30.0
    backoff: Backoff = field(default_factory=Backoff)
    drain_timeout_s: float = 10.0  # a half-closed call must finish within this, else cut
    # A probing call sends its config alone for this long before the audio (`RetryPolicy`).
    probe_s: float = 0.5
    end_timeout_s: float = 30.0  # after the audio ended, give up reconnecting after this


@dataclass
class _Call:
    """One streaming call, shared by its request generator and its reader. Its `state`
    changes only through `to()`, which checks the transition (`policy.CallState`)."""

    map: OffsetMap
    opened: float
    ended: asyncio.Future[str]  # set (with a cause) to cut the call
    probe: bool = False  # hold the audio back for `probe_s` after the config
    state: CallState = CallState.OPEN
    close_cause: str | None = None  # why a half-close was asked (CLOSING): "rotate"
    responses: int = 0
    drain: asyncio.TimerHandle | None = None
    rpc: Any = None  # the client's streaming call, once connected

    def to(self, state: CallState) -> None:
        self.state = check_transition(self.state, state)

    def close(self, cause: str) -> None:
        """Ask the request generator to half-close at its next chance."""
        self.to(CallState.CLOSING)
        self.close_cause = cause


_DONE = object()


class StreamRun:
    """One session channel's upstream run (see the module docstring)."""

    def __init__(self, api: Api, client: Any, config: StreamConfig, *, diarize: bool,
                 params: RunParams, hooks: Hooks, run_id: int = 0) -> None:
        self.api, self.client, self.config, self.diarize = api, client, config, diarize
        self.params, self.hooks, self.run_id = params, hooks, run_id
        self.policy = RotationPolicy.for_limit(params.rotate_s)
        self.buffer = ReplayBuffer(params.replay_s)
        self.transcript = Transcript(self.buffer)
        self.flushes = PendingFlushes()
        self.ended = False
        self._changed = asyncio.Event()
        self._out: asyncio.Queue[Any] = asyncio.Queue(OUT_QUEUE)
        self._config_request: Any = None

    # --- the session side (the `UpstreamRun` contract) ---
    def push(self, block: AudioBlock) -> None:
        """Audio for Google, taken into the replay buffer now (overlap with audio already
        pushed is cut off). Never waits; bounded by the buffer (the module docstring).
        Ignored after `end()`."""
        if not self.ended:
            self.buffer.push(block)
            self._notify()

    def flush(self) -> None:
        """Finalize everything pushed so far; `flushed` follows its finals. Ignored after `end()`."""
        if not self.ended:
            self.flushes.add(self.buffer.end)
            self._notify()

    def end(self) -> None:
        """The end of the audio: the rest of the finals, then `events()` ends. Idempotent."""
        self.ended = True
        self._notify()

    async def events(self) -> AsyncIterator[TranscriptEvent]:
        """Run the calls; yield events until every final is out (or a fatal error). Closing
        the iterator early cancels the call in progress."""
        work = asyncio.create_task(self._supervise(), name=f"stt-calls-{self.run_id}")
        try:
            while (item := await self._out.get()) is not _DONE:
                yield item
        finally:
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
            self.hooks.run_ended(self.run_id)

    def _notify(self) -> None:
        # Wake every waiter once: each waits on the event current when it checked.
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    # --- the supervisor: one call after another ---
    async def _supervise(self) -> None:
        try:
            await self._calls()
        except Exception as exc:  # a bug, not Google: say so rather than hang the session
            log.exception("stt[%d]: upstream stream failed", self.run_id)
            self.hooks.call_failed(self.run_id, exc, "fatal")
            await self._out.put(TranscriptEvent(kind="error", fatal=True,
                                                message=f"upstream failed: {exc!r}"))
        await self._out.put(_DONE)

    async def _calls(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self._config_request = self.api.config_request(self.config, diarize=self.diarize)
        except ValueError as exc:  # a config the API cannot take (v1 with language auto)
            self.hooks.call_failed(self.run_id, exc, "fatal")
            await self._out.put(TranscriptEvent(kind="error", fatal=True, message=str(exc)))
            return
        retry = RetryPolicy(self.params.backoff, self.params.probe_s, self.params.end_timeout_s)
        while True:
            await self._until_work()
            await self._answer_flushes()
            if self._pending() is None:
                if self.ended:
                    return
                continue
            if retry.give_up(loop.time(), ended=self.ended):
                await self._give_up()
                return
            await self._report_lost(self.buffer.take_lost())
            self.hooks.call_opened(self.run_id, retry.cause)
            call = _Call(OffsetMap(), loop.time(), loop.create_future(), probe=retry.probe)
            outcome = await self._call(call)
            decision = retry.after(outcome, responded=call.responses > 0,
                                   age_s=loop.time() - call.opened)
            if outcome.kind is CallEnd.CLEAN:
                if call.map.session_end is not None:
                    self.buffer.finalize(call.map.session_end)
                await self._answer_flushes()
            if decision.failed:
                self.hooks.call_failed(self.run_id, outcome.error or outcome.cause
                                       or outcome.kind.value, outcome.kind.value)
            if decision.stop:  # FATAL: always a classified error
                assert outcome.error is not None
                await self._out.put(TranscriptEvent(
                    kind="error", fatal=True, message=f"upstream refused the stream: "
                    f"{type(outcome.error).__name__}: {_message(outcome.error)}"))
                return
            if decision.wait_s > 0:
                await asyncio.sleep(decision.wait_s)

    def _pending(self) -> AudioBlock | None:
        """Retained audio not yet covered by a final: what the next call starts with."""
        return self.buffer.read(self.buffer.delivered_until, 1)

    async def _until_work(self) -> None:
        while not (self.ended or self.flushes or self._pending() is not None):
            await self._changed.wait()

    async def _answer_flushes(self) -> None:
        """Emit `flushed` for each FLUSH with no unfinalized audio left before it."""
        pending = self._pending()
        for sample in self.flushes.answer(pending.start if pending is not None else None):
            pos = sample / SAMPLE_RATE
            await self._out.put(TranscriptEvent(kind="flushed", start=pos, end=pos))

    async def _report_lost(self, samples: int) -> None:
        if samples <= 0:
            return
        seconds = samples / SAMPLE_RATE
        self.hooks.audio_lost(self.run_id, seconds)
        await self._out.put(TranscriptEvent(
            kind="error", lost_s=seconds,
            message=f"{seconds:.1f} s of audio not transcribed: the upstream outage outlasted "
                    f"the {self.params.replay_s:g} s replay buffer"))

    async def _give_up(self) -> None:
        """The audio has ended and Google stays unreachable: report the rest as lost."""
        rest = self.buffer.take_lost() + round(self.buffer.retained_s * SAMPLE_RATE)
        self.buffer.finalize(self.buffer.end)
        await self._report_lost(rest)
        await self._answer_flushes()

    # --- one call ---
    async def _call(self, call: _Call) -> Outcome:
        loop = asyncio.get_running_loop()
        requests = self._requests(call)
        # Wall-time limit: a stalled session's call must still end before Google's limit.
        hard = loop.call_at(call.opened + self.params.rotate_s, self._rotate_now, call)
        # Connecting is part of the reader, so a cut (the wall-time limit) also ends a call
        # whose connection hangs.
        reader = asyncio.create_task(self._read(requests, call), name=f"stt-read-{self.run_id}")
        try:
            await asyncio.wait({reader, call.ended}, return_when=asyncio.FIRST_COMPLETED)
            outcome = (reader.result() if reader.done()
                       else Outcome(CallEnd.CUT, call.ended.result()))
            log.debug("stt[%d]: call ended (%s, %s) after %.1f s of audio", self.run_id,
                      outcome.kind.value, outcome.cause or outcome.error, call.map.audio_s)
            return outcome
        finally:
            call.to(CallState.FINISHED)
            hard.cancel()
            if call.drain is not None:
                call.drain.cancel()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            if call.rpc is not None:
                call.rpc.cancel()
            self._notify()  # let the request generator see FINISHED and return

    def _rotate_now(self, call: _Call) -> None:
        """The forced rotation at `rotate_s`. Cut and replay from `delivered_until` (the utterance in
        progress is heard whole by the next call) while the buffer holds all unfinalized audio
        and that is at most half a call; otherwise (long silence, mostly) half-close: Google
        answers for all it got, and nothing is replayed or lost — at worst a word spanning
        the close is split in two."""
        if call.state is not CallState.OPEN or call.ended.done():
            return
        unfinalized_s = (self.buffer.end - self.buffer.delivered_until) / SAMPLE_RATE
        # A replay longer than half a call could keep the next call from making progress.
        if self.buffer.intact and unfinalized_s <= self.params.rotate_s / 2:
            _cut(call, ROTATE)
        else:
            call.close(ROTATE)
            self._notify()

    async def _read(self, requests: AsyncIterator[Any], call: _Call) -> Outcome:
        loop = asyncio.get_running_loop()
        try:
            # No `retry=`: with the service down it retries, then hangs (docs/notes/google-speech.md).
            call.rpc = await self.client.streaming_recognize(requests=requests)
            async for response in call.rpc:
                call.responses += 1
                if call.responses == 1:
                    self.hooks.call_healthy(self.run_id)
                results, speech = self.api.parse(response)
                if speech is not None and self.config.vad_events:
                    for event in self.transcript.on_speech_event(speech, call.map):
                        await self._out.put(event)
                final = False
                for result in results:
                    if (event := self.transcript.on_result(result, call.map)) is not None:
                        await self._out.put(event)
                    final = final or result.is_final
                if (final and call.state is CallState.OPEN
                        and self.policy.due(call.map.audio_s, loop.time() - call.opened,
                                            after_final=True)
                        and not call.ended.done()):
                    call.ended.set_result(ROTATE)  # a quiet moment: cut and replay the tail
                    return Outcome(CallEnd.CUT, ROTATE)
        except Exception as exc:
            return self._failed(exc)
        if call.state is CallState.HALF_CLOSED:
            return Outcome(CallEnd.CLEAN, call.close_cause)
        return Outcome(CallEnd.CLOSED, "closed by the server")

    def _failed(self, exc: BaseException) -> Outcome:
        kind = CallEnd(self.api.classify(exc))
        if kind is CallEnd.FATAL and not _is_api_error(exc):
            log.error("stt[%d]: unexpected upstream error", self.run_id, exc_info=exc)
        return Outcome(kind, error=exc)

    async def _requests(self, call: _Call) -> AsyncIterator[Any]:
        """The call's requests: config, then audio from `delivered_until` on, then half-close."""
        yield self._config_request
        if call.probe:
            log.debug("stt[%d]: holding the audio %.1f s for the config's answer", self.run_id,
                      self.params.probe_s)
            await asyncio.sleep(self.params.probe_s)
        cursor = self.buffer.delivered_until
        rotate_samples = round(self.params.rotate_s * SAMPLE_RATE)
        while call.state is CallState.OPEN:
            stop_at = self.flushes.first
            if stop_at is None and self.ended:
                stop_at = self.buffer.end
            room = rotate_samples - call.map.sent
            changed = self._changed
            if room <= 0:  # audio time reached the limit
                self._rotate_now(call)
                if call.state is CallState.OPEN:  # cut: wait for the supervisor to end the call
                    await changed.wait()
                    continue
                break
            piece = self.buffer.read(cursor, min(REQUEST_SAMPLES, room))
            if piece is not None and (stop_at is None or piece.start < stop_at):
                if stop_at is not None and piece.end > stop_at:
                    piece = piece.until(stop_at)
                if piece.start > cursor:  # dropped before it was ever sent on this call
                    await self._report_lost(self.buffer.take_skipped(cursor, piece.start))
                call.map.add(piece.start, piece.samples)
                cursor = piece.end
                yield self.api.audio_request(piece.pcm)
                continue
            if stop_at is not None:
                break  # everything up to the FLUSH / end is sent: half-close
            await changed.wait()
        if call.state is CallState.FINISHED:
            return
        call.to(CallState.HALF_CLOSED)
        call.drain = asyncio.get_running_loop().call_later(
            self.params.drain_timeout_s, _cut, call, "drain timeout")


def _cut(call: _Call, cause: str) -> None:
    if not call.ended.done():
        call.ended.set_result(cause)


def _is_api_error(exc: BaseException) -> bool:
    return type(exc).__module__.startswith("google.api_core")


def _message(exc: BaseException) -> str:
    return str(getattr(exc, "message", None) or exc)


__all__ = ["OUT_QUEUE", "REQUEST_SAMPLES", "Api", "Hooks", "RunParams", "StreamRun"]
