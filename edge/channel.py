"""One channel of a `/v1/listen` session: audio -> upstream + local diarizer -> what it says.

A session has one channel (mono, or downmixed), or one per input channel with Deepgram's
`multichannel=true`; each is labelled on its own (its own upstream run, diarizer session,
speaker numbers and end-of-speech decisions) and its messages carry `[index, count]`.

What a channel does is its session's `Plan` (edge/plan.py). Its end-of-speech decisions
(`speech_final`, `UtteranceEnd`, edge/endpoint.py) hear from one voice detector:
- with an upstream: the words of every result, its voice-activity events and result end
  offsets; and, for long silences where the upstream says nothing, the audio that arrived at
  least `VOICE_LAG_S` ago (the upstream reports speech within that long of receiving it);
- diarization-only: the local diarizer's speech activity (`SpeakerTimeline.voiced`). Each
  run of speech (pauses under `SEGMENT_GAP_S` inside it) is one final with no words, and its
  end counts as the last word's end.

Audio goes to the upstream run synchronously (`UpstreamRun.push`, in the receiving task): the
run's own bound (Google's replay buffer, EDGE_STT_REPLAY_S, oldest dropped) is the only one on
it, and audio it loses reaches the client as an `UPSTREAM_AUDIO_LOST` Error. Held finals wait
in the end-of-speech decisions, at most until the next result or `VOICE_LAG_S` of audio later.
Speaker numbers for words: edge/speakers.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edge import protocol
from edge.audio import SessionAudio
from edge.clock import FRAME_S, AudioBlock
from edge.diarization.timeline import SpeakerTurn
from edge.endpoint import EndOfSpeech, Final, UtteranceEnd, VoiceRuns
from edge.health import Status
from edge.metrics import Metrics
from edge.plan import Plan
from edge.protocol import ListenParams, ModelInfo
from edge.settings import Settings
from edge.speakers import SpeakerNumbers, label_words
from edge.stt.base import TranscriptEvent, Upstream, UpstreamRun

if TYPE_CHECKING:
    from edge.diarization.engine import DiarizationEngine
    from edge.diarization.session import DiarizerSession

log = logging.getLogger("edge.session")

TICK_S = 0.25  # how often turns, diarizer voice activity and silence are looked at
VOICE_LAG_S = 1.0  # the upstream reports speech within this long of receiving the audio
SEGMENT_GAP_S = 0.32  # diarization-only: a shorter pause does not end a run of speech
MAX_HELD_TURNS = 256  # turns of speakers the transcript has not named yet; oldest dropped


@dataclass(frozen=True)
class ChannelContext:
    """What a session's channels share (built once per session)."""

    request_id: str
    params: ListenParams
    plan: Plan
    settings: Settings
    status: Status
    metrics: Metrics
    upstream: Upstream | None
    engine: DiarizationEngine | None
    audio: SessionAudio
    model: ModelInfo
    diarizer_model: ModelInfo
    send: Callable[[dict[str, Any]], None]


class Channel:
    def __init__(self, ctx: ChannelContext, index: int, count: int) -> None:
        self.ctx = ctx
        self.index = index
        self.ref = (index, count)
        p = ctx.params
        self.eos: EndOfSpeech[dict[str, Any]] = EndOfSpeech(
            None if p.endpointing is None else p.endpointing / 1000,
            None if p.utterance_end_ms is None else p.utterance_end_ms / 1000)
        self.speakers = SpeakerNumbers()
        self._turn_speakers = SpeakerNumbers()  # when the words' labels are not the diarizer's
        self.diar: DiarizerSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._upstream_task: asyncio.Task[None] | None = None
        # The upstream run while it takes audio: None without one, and once it has ended.
        self._run: UpstreamRun | None = None
        self._finalize_pending = 0
        self._finals_since_finalize = 0
        self._held_turns: deque[SpeakerTurn] = deque(maxlen=MAX_HELD_TURNS)
        self.voice = VoiceRuns(FRAME_S, SEGMENT_GAP_S)  # diarization-only voice activity

    # --- lifecycle ---
    def start(self) -> None:
        """Open the local diarizer session (if planned) and start this channel's tasks."""
        ctx, plan = self.ctx, self.ctx.plan
        if plan.local and ctx.engine is not None:
            if ctx.engine.final:  # off or broken for good: hold nothing
                # Broken is news to a client that asked for labels; switched off is not.
                if ctx.engine.state != "disabled" and plan.diarizer_errors:
                    self.ctx.send(protocol.error_message(
                        "DIARIZATION_UNAVAILABLE",
                        f"local speaker labels unavailable: {ctx.engine.reason}"))
            else:
                suffix = f"/{self.index}" if self.ref[1] > 1 else ""
                self.diar = ctx.engine.open_session(ctx.request_id + suffix)
        if ctx.upstream is not None and plan.upstream is not None:
            try:
                self._run = ctx.upstream.open_run(plan.upstream)
            except Exception as exc:  # an upstream bug must not take the session down
                self._upstream_failed(exc)
            else:
                self._upstream_task = asyncio.create_task(self._upstream_loop(self._run),
                                                          name="upstream")
                self._tasks.append(self._upstream_task)
        self._tasks.append(asyncio.create_task(self._tick_loop(), name="channel-tick"))

    def push(self, block: AudioBlock) -> None:
        if self._run is not None:
            self._run.push(block)
        if self.diar is not None:
            self.diar.push(block)

    def finalize(self) -> None:
        """Deepgram's Finalize: finals for everything so far, answered with from_finalize."""
        if self._run is not None:
            self._finalize_pending += 1
            self._finals_since_finalize = 0
            self._run.flush()
            return
        if self.ctx.plan.voice == "sortformer":
            self._read_voice()
            if self._close_run(from_finalize=True):
                self._release(self.eos.flush())
                return
        self._release(self.eos.flush())
        self._send_empty_final(from_finalize=True)

    async def finish(self, timeout: float) -> None:
        """The audio ended: every final, turn and end-of-speech decision still owed."""
        if self._run is not None:
            self._run.end()
        if self.diar is not None:
            with contextlib.suppress(Exception):
                await self.diar.close()  # places the last frames and ends open turns
        if self.ctx.plan.voice == "sortformer":
            self._read_voice()
            self._close_run(from_finalize=False)
        task = self._upstream_task
        if task is not None and not (await asyncio.wait({task}, timeout=timeout))[0]:
            log.warning("session %s: upstream did not finish within %.0f s",
                        self.ctx.request_id, timeout)
        self.eos.heard(self.ctx.audio.clock)
        self._release(self.eos.flush())
        if self.ctx.plan.send_turns and self.diar is not None:
            self._send_turns(final=True)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.diar is not None:
            with contextlib.suppress(Exception):
                await self.diar.close()

    # --- the upstream ---
    async def _upstream_loop(self, run: UpstreamRun) -> None:
        try:
            async for event in run.events():
                await self._on_event(event)
        except Exception as exc:  # an upstream bug must not take the session down
            self._upstream_failed(exc)
        finally:
            self._run = None

    def _upstream_failed(self, exc: Exception) -> None:
        log.exception("session %s: upstream failed", self.ctx.request_id, exc_info=exc)
        self.ctx.send(protocol.error_message("UPSTREAM_FAILED", f"transcription stopped: {exc}"))

    async def _on_event(self, ev: TranscriptEvent) -> None:
        p, eos = self.ctx.params, self.eos
        if ev.kind == "result":
            for w in ev.words:
                eos.speech(w.start, w.end)
            eos.heard(ev.end)
            if ev.is_final:
                await self._on_final(ev)
            else:
                self._release(eos.ready())
                if p.interim_results:
                    self.ctx.send(self._results(ev))
        elif ev.kind == "speech_started":
            eos.speech(ev.start, ev.start)
            self._release(eos.ready())
            if p.vad_events:
                self.ctx.send(protocol.speech_started_message(ev.start, self.ref))
        elif ev.kind == "speech_ended":
            eos.heard(ev.start)
            self._release(eos.ready())
        elif ev.kind == "flushed" and self._finalize_pending:
            self._finalize_pending -= 1
            eos.heard(ev.start)
            self._release(eos.flush())
            if not self._finals_since_finalize:
                self._send_empty_final(from_finalize=True)
        elif ev.kind == "error":
            variant = "UPSTREAM_AUDIO_LOST" if ev.lost_s else "UPSTREAM_ERROR"
            self.ctx.send(protocol.error_message(variant, ev.message or "upstream error",
                                              lost_s=round(ev.lost_s, 3)))
            if ev.lost_s:
                self.ctx.metrics.upstream_lost_seconds.inc(ev.lost_s)
                self.ctx.status.notice("upstream", f"session {self.ctx.request_id}: {ev.message}")
            if ev.fatal:
                self._run = None

    async def _on_final(self, ev: TranscriptEvent) -> None:
        if ev.words and self.diar is not None and self.ctx.plan.wait_for_labels:
            wait = self.ctx.settings.edge_label_wait_ms / 1000
            await self.diar.wait_covered(ev.words[-1].end, wait)
        self._finals_since_finalize += 1
        message = self._results(ev, from_finalize=self._finalize_pending > 0)
        if ev.words:
            received = self.ctx.audio.received_at(ev.words[-1].end)
            if received is not None:
                self.ctx.metrics.final_latency.observe(time.monotonic() - received)
        self.eos.final(message, (ev.words[0].start, ev.words[-1].end) if ev.words else None)
        self._release(self.eos.ready())

    # --- the local diarizer: turns, and voice activity in diarization-only mode ---
    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            if self.ctx.plan.voice == "sortformer":
                self._read_voice()
            elif self._run is not None:
                # Silence where the upstream says nothing: what it has had VOICE_LAG_S to hear.
                self.eos.heard(self.ctx.audio.received_before(time.monotonic() - VOICE_LAG_S))
            self._release(self.eos.ready())
            if self.ctx.plan.send_turns and self.diar is not None:
                self._send_turns(final=False)

    def _read_voice(self) -> None:
        """Diarization-only: new diarizer frames -> runs of speech -> finals without words."""
        if self.diar is None:
            return
        timeline = self.diar.timeline
        first, voiced = timeline.voiced(self.voice.next_frame)
        for kind, start, end in self.voice.feed(first, voiced.tolist(), self.eos):
            if kind == "started":
                if self.ctx.params.vad_events:
                    self.ctx.send(protocol.speech_started_message(start, self.ref))
            else:
                self._run_final(start, end, from_finalize=False)
        self.eos.heard(timeline.covered_until)

    def _close_run(self, *, from_finalize: bool) -> bool:
        """The open run of speech becomes a final without words; False if none was open."""
        run = self.voice.close()
        if run is None:
            return False
        self._run_final(*run, from_finalize=from_finalize)
        return True

    def _run_final(self, start: float, end: float, *, from_finalize: bool) -> None:
        ev = TranscriptEvent(kind="result", start=start, end=end, is_final=True)
        self.eos.final(self._results(ev, from_finalize, labelled=([], None)), (start, end))
        self._release(self.eos.ready())

    def _send_turns(self, *, final: bool) -> None:
        """SpeakerTurns (asked with speaker_turns=true), numbered like the transcript's
        words when the local diarizer labels them too: a turn of a speaker the transcript has
        not named yet waits until it does (or the session ends: the rest are numbered after).
        Otherwise (diarization-only, Google's labels, no labels) in order of first turn."""
        assert self.diar is not None
        self._held_turns.extend(self.diar.timeline.pop_turns())
        shared = self.ctx.plan.upstream is not None and self.ctx.plan.labels == "sortformer"
        numbers = self.speakers if shared else self._turn_speakers
        waiting: deque[SpeakerTurn] = deque(maxlen=MAX_HELD_TURNS)
        for turn in self._held_turns:
            number = numbers.known(turn.speaker)
            if number is None and (final or not shared):
                number = numbers.number(turn.speaker)
            if number is None:
                waiting.append(turn)
                continue
            self.ctx.send(protocol.speaker_turn_message(number, turn.start, turn.end,
                                                     turn.is_final, self.ref))
        self._held_turns = waiting

    # --- messages ---
    def _results(self, ev: TranscriptEvent, from_finalize: bool = False,
                 labelled: tuple[list[dict[str, Any]], str | None] | None = None) -> dict[str, Any]:
        """The Results message for `ev`, its words labelled with speakers (edge/speakers.py)
        unless `labelled` gives the word entries and their source already."""
        ctx, plan = self.ctx, self.ctx.plan
        words, source = labelled or label_words(ev.words, plan.labels, self.diar, self.speakers)
        message = protocol.results_message(
            request_id=ctx.request_id, model=ctx.model, start=ev.start, end=ev.end,
            is_final=ev.is_final, speech_final=False, from_finalize=from_finalize,
            transcript=ev.transcript, confidence=ev.confidence, words=words,
            speaker_source=source if plan.diarize else None,
            diarizer=ctx.diarizer_model if source == "sortformer" else None, channel=self.ref,
        )
        if source is None and plan.diarize and words:
            # Extension: why these words carry no speaker (loading, refused, degraded, ...).
            message["speaker_note"] = (
                self.diar.reason or f"local diarizer {self.diar.state}" if self.diar is not None
                else plan.label_reason or "no speaker labels for this session")
        return message

    def _send_empty_final(self, from_finalize: bool) -> None:
        now = self.ctx.audio.clock
        ev = TranscriptEvent(kind="result", start=now, end=now, is_final=True)
        self.ctx.send(self._results(ev, from_finalize, labelled=([], None)))

    def _release(self, decided: list[Final[dict[str, Any]] | UtteranceEnd]) -> None:
        for item in decided:
            if isinstance(item, UtteranceEnd):
                self.ctx.send(protocol.utterance_end_message(item.last_word_end, self.ref))
            else:
                item.item["speech_final"] = item.speech_final
                self.ctx.send(item.item)


__all__ = ["Channel", "ChannelContext"]
