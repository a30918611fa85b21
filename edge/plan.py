"""A session's plan: one pure decision from the query, the settings and the upstream.

`plan_session(params, settings, upstream)` says, for one `/v1/listen` session:
- the upstream config (None: no upstream, the session runs diarization-only);
- who labels words (`labels`: "google", "sortformer" or None) and whether a local diarizer
  session is opened at all (`local`: for labels, for SpeakerTurns, or as the voice detector
  of diarization-only mode);
- what the client is sent (`send_turns`, `wait_for_labels`, `diarizer_errors`).

`EDGE_STT_DIARIZATION` is read here and nowhere else:
- `auto`: Google labels where it can (its capabilities for the model and language), else the
  local diarizer;
- `google`: only Google labels (forced on; no local diarizer, so no SpeakerTurns);
- `local`: only the local diarizer labels;
- `off`: nobody labels speakers, and no local diarizer runs.
`STT_ENABLE_NEMO_DIARIZATION_FALLBACK=false` also means no local diarizer.
`edge check` asks `local_diarizer_used()` the same question.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from edge.protocol import MULTILINGUAL, ListenParams
from edge.settings import Settings
from edge.stt.base import Capabilities, StreamConfig

# What the upstream can do for a (model, language); None when there is no upstream.
UpstreamCaps = Callable[[str, str], Capabilities] | None
LabelSource = Literal["google", "sortformer"]


@dataclass(frozen=True)
class Plan:
    """What one session does (see the module docstring). `diarize` is the client's effective
    choice (EDGE_DIARIZE_DEFAULT when it did not say); `voice` is the voice detector for end
    of speech: the upstream's results and events, or the local diarizer's speech activity."""

    upstream: StreamConfig | None
    diarize: bool
    labels: LabelSource | None
    local: bool
    send_turns: bool
    wait_for_labels: bool
    diarizer_errors: bool
    voice: Literal["upstream", "sortformer"] | None
    channels: int
    label_reason: str | None = None  # why words carry no speaker, when diarize asked for them


def plan_session(params: ListenParams, settings: Settings, upstream: UpstreamCaps) -> Plan:
    """The plan for a session with query `params` (pure: no I/O, no state).

    `upstream(model, language)` tells what the upstream can do; None means there is no
    upstream (no credentials, EDGE_STT_API=none): the session runs diarization-only.
    """
    mode = settings.edge_stt_diarization
    local_ok = settings.stt_enable_nemo_diarization_fallback and mode in ("auto", "local")
    diarize = settings.edge_diarize_default if params.diarize is None else params.diarize
    channels = params.channels if params.multichannel else 1
    send_turns = params.speaker_turns and local_ok
    if upstream is None:
        local = local_ok  # the only thing that can hear anything: labels, turns, voice
        labels: LabelSource | None = "sortformer" if diarize and local else None
        return Plan(
            upstream=None, diarize=diarize, labels=labels, local=local, send_turns=send_turns,
            wait_for_labels=False, diarizer_errors=local and (diarize or send_turns),
            voice="sortformer" if local else None, channels=channels,
            label_reason=None if labels or not diarize else _no_local(settings),
        )
    language = params.language or settings.edge_stt_language
    if language == MULTILINGUAL:
        language = "auto"  # the upstream's multilingual mode
    model = params.model or settings.edge_stt_model
    caps = upstream(model, language)
    google = diarize and (mode == "google" or (mode == "auto" and caps.diarization))
    labels = "google" if google else ("sortformer" if diarize and local_ok else None)
    reason = None
    if diarize and labels is None:
        reason = caps.reason if mode == "auto" else _no_local(settings)
    config = StreamConfig(
        language=language, model=model, interim_results=params.interim_results,
        punctuate=params.punctuate or params.smart_format, diarize=google,
        # Google's voice events feed SpeechStarted and the end-of-speech decisions.
        vad_events=(params.vad_events or params.utterance_end_ms is not None
                    or params.endpointing is not None),
        max_speakers=settings.stt_nemo_diarization_max_speakers,
    )
    local = labels == "sortformer" or send_turns
    return Plan(
        upstream=config, diarize=diarize, labels=labels, local=local, send_turns=send_turns,
        wait_for_labels=labels == "sortformer", diarizer_errors=local and (diarize or send_turns),
        voice="upstream", channels=channels, label_reason=reason,
    )


def local_diarizer_used(settings: Settings) -> bool:
    """Whether any session could open a local diarizer session under `settings` (for `edge
    check`): the plan for a session asking for labels and turns, with and without an
    upstream that cannot label."""
    asking = ListenParams(diarize=True, speaker_turns=True)
    cannot = lambda _m, _l: Capabilities(False, "")  # noqa: E731
    return any(plan_session(asking, settings, caps).local for caps in (None, cannot))


def _no_local(settings: Settings) -> str:
    if settings.edge_stt_diarization in ("off", "google"):
        return f"EDGE_STT_DIARIZATION={settings.edge_stt_diarization}"
    return "local diarizer disabled (STT_ENABLE_NEMO_DIARIZATION_FALLBACK=false)"


__all__ = ["Plan", "UpstreamCaps", "local_diarizer_used", "plan_session"]
