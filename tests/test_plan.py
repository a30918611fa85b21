"""The session plan: one table over query x settings x upstream capabilities (edge/plan.py)."""

from __future__ import annotations

from typing import Any

import pytest

from edge.plan import local_diarizer_used, plan_session
from edge.protocol import parse_listen_query
from edge.settings import load_settings
from edge.stt.base import Capabilities


def google_can(model: str, language: str) -> Capabilities:
    return Capabilities(True)


def google_cannot(model: str, language: str) -> Capabilities:
    return Capabilities(False, f"{model}/{language}: no streaming diarization")


# query, settings, upstream -> labels, local, send_turns, wait_for_labels, diarizer_errors,
# upstream asked to diarize (None: no upstream), voice detector
ROWS: list[tuple[str, dict[str, Any], Any, tuple[Any, ...]]] = [
    # diarize unset: EDGE_DIARIZE_DEFAULT (true) decides
    ("", {}, google_cannot, ("sortformer", True, False, True, True, False, "upstream")),
    ("", {"edge_diarize_default": False}, google_cannot,
     (None, False, False, False, False, False, "upstream")),
    ("", {}, google_can, ("google", False, False, False, False, True, "upstream")),
    # diarize=false never waits for labels, never hears of the diarizer
    ("diarize=false", {}, google_cannot, (None, False, False, False, False, False, "upstream")),
    ("diarize=false", {}, google_can, (None, False, False, False, False, False, "upstream")),
    ("diarize=false&speaker_turns=true", {}, google_can,
     (None, True, True, False, True, False, "upstream")),
    # EDGE_STT_DIARIZATION
    ("diarize=true", {"edge_stt_diarization": "local"}, google_can,
     ("sortformer", True, False, True, True, False, "upstream")),
    ("diarize=true", {"edge_stt_diarization": "google"}, google_cannot,
     ("google", False, False, False, False, True, "upstream")),
    ("diarize=true&speaker_turns=true", {"edge_stt_diarization": "google"}, google_cannot,
     ("google", False, False, False, False, True, "upstream")),
    ("diarize=true&speaker_turns=true", {"edge_stt_diarization": "off"}, google_can,
     (None, False, False, False, False, False, "upstream")),
    ("diarize=true", {"stt_enable_nemo_diarization_fallback": False}, google_cannot,
     (None, False, False, False, False, False, "upstream")),
    # no upstream: diarization-only; the diarizer is the voice detector
    ("", {}, None, ("sortformer", True, False, False, True, None, "sortformer")),
    ("diarize=false", {}, None, (None, True, False, False, False, None, "sortformer")),
    ("speaker_turns=true", {}, None, ("sortformer", True, True, False, True, None, "sortformer")),
    ("", {"edge_stt_diarization": "off"}, None, (None, False, False, False, False, None, None)),
    ("", {"stt_enable_nemo_diarization_fallback": False}, None,
     (None, False, False, False, False, None, None)),
]


@pytest.mark.parametrize(("query", "overrides", "upstream", "expected"), ROWS)
def test_plan_follows_the_table_of_queries_settings_and_upstreams(
    query: str, overrides: dict[str, Any], upstream: Any, expected: tuple[Any, ...],
) -> None:
    plan = plan_session(parse_listen_query(query), load_settings(**overrides), upstream)
    google = None if plan.upstream is None else plan.upstream.diarize
    got = (plan.labels, plan.local, plan.send_turns, plan.wait_for_labels, plan.diarizer_errors,
           google, plan.voice)
    assert got == expected


def test_plan_maps_language_model_and_channels() -> None:
    settings = load_settings(edge_stt_model="chirp_3", edge_stt_language="en-US")
    seen: list[tuple[str, str]] = []

    def caps(model: str, language: str) -> Capabilities:
        seen.append((model, language))
        return Capabilities(False, "x")

    plan = plan_session(parse_listen_query("language=multi&model=nova-3&channels=2"), settings, caps)
    assert plan.upstream is not None
    assert (plan.upstream.language, plan.upstream.model) == ("auto", "chirp_3") == seen[0][::-1]
    assert plan.channels == 1  # channels without multichannel: downmixed
    plan = plan_session(parse_listen_query("language=de-DE&model=long&channels=2&multichannel=true"),
                        settings, caps)
    assert plan.upstream is not None and plan.channels == 2
    assert (plan.upstream.language, plan.upstream.model) == ("de-DE", "long")


def test_plan_asks_the_upstream_for_voice_events_only_when_needed() -> None:
    settings = load_settings()
    off = plan_session(parse_listen_query("endpointing=false"), settings, google_cannot)
    assert off.upstream is not None and not off.upstream.vad_events
    for query in ("", "vad_events=true&endpointing=false", "utterance_end_ms=1000&endpointing=false"):
        plan = plan_session(parse_listen_query(query), settings, google_cannot)
        assert plan.upstream is not None and plan.upstream.vad_events, query


@pytest.mark.parametrize(("overrides", "used"), [
    ({}, True),
    ({"edge_stt_diarization": "local"}, True),
    ({"edge_stt_diarization": "google"}, False),
    ({"edge_stt_diarization": "off"}, False),
    ({"stt_enable_nemo_diarization_fallback": False}, False),
])
def test_edge_check_asks_the_plan(overrides: dict[str, Any], used: bool) -> None:
    assert local_diarizer_used(load_settings(**overrides)) is used
