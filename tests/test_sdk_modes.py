"""Deepgram's Python SDK in every mode: it parses every message the daemon sends.

Modes: Google labels (v1), no labels asked, local Sortformer labels (chirp_3 + tiny random
model), diarization-only (no upstream; the Sortformer is the voice detector), and settings
that turn labelling off. The SDK turns a message type it cannot parse into None: none may
arrive unless the client asked for it (SpeakerTurn with speaker_turns=true).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from edge.app import App
from tests.fakes.google_speech import encode, fake_speech, utterances
from tests.helpers.daemon import KEY, appliance, with_fake_google

deepgram = pytest.importorskip("deepgram")
SR = 16000
PARSED = {"ListenV1Results", "ListenV1Metadata", "ListenV1UtteranceEnd", "ListenV1SpeechStarted"}


async def sdk_stream(app: App, audio: bytes, **options: Any) -> list[Any]:
    """Stream `audio` through the SDK's async client; every message it yields."""
    from deepgram.environment import DeepgramClientEnvironment

    base = f"127.0.0.1:{app.server.port}"
    env = DeepgramClientEnvironment(base=f"http://{base}", production=f"ws://{base}",
                                    agent=f"ws://{base}", agent_rest=f"http://{base}")
    client = deepgram.AsyncDeepgramClient(api_key=KEY, environment=env)
    received: list[Any] = []
    async with client.listen.v1.connect(model="nova-3", encoding="linear16", sample_rate=SR,
                                        **options) as conn:
        for i in range(0, len(audio), 3200):
            await conn.send_media(audio[i:i + 3200])
        await conn.send_close_stream()
        async for message in conn:
            received.append(message)
    return received


ASK = {"interim_results": True, "utterance_end_ms": 1000, "vad_events": True, "endpointing": 300}


def check_parsed(received: list[Any], allowed: set[str] = PARSED) -> list[Any]:
    names = [type(m).__name__ for m in received]
    assert None not in received and set(names) <= allowed, names
    assert names[-1] == "ListenV1Metadata"
    return [m for m in received if type(m).__name__ == "ListenV1Results"]


async def test_the_sdk_parses_google_speaker_labels() -> None:
    audio, script = encode(utterances(3, words=3, gap_s=1.2))
    async with with_fake_google(edge_stt_api="v1", edge_stt_language="en-US",
                                edge_stt_model="latest_long") as app:
        results = check_parsed(await sdk_stream(app, audio, diarize=True, **ASK))
    words = [w for r in results if r.is_final for w in r.channel.alternatives[0].words]
    assert [w.word for w in words] == [s.text for s in script]
    assert words[0].speaker == 0 and all(isinstance(w.speaker, int) for w in words)


# diarize=false; or asked, but EDGE_STT_DIARIZATION=off (and v1 Google could label).
@pytest.mark.parametrize(("diarize", "overrides"), [
    (False, {}),
    (True, {"edge_stt_diarization": "off", "edge_stt_api": "v1", "edge_stt_language": "en-US",
            "edge_stt_model": "latest_long"}),
])
async def test_the_sdk_parses_sessions_without_labels(diarize: bool, overrides: dict[str, Any]) -> None:
    audio, script = encode(utterances(2, words=3, gap_s=1.2))
    async with with_fake_google(**overrides) as app:
        received = await sdk_stream(app, audio, diarize=diarize, **ASK)
    results = check_parsed(received)
    names = {type(m).__name__ for m in received}
    assert {"ListenV1UtteranceEnd", "ListenV1SpeechStarted"} <= names
    words = [w for r in results if r.is_final for w in r.channel.alternatives[0].words]
    assert [w.word for w in words] == [s.text for s in script]
    assert all(w.speaker is None for w in words)
    assert any(r.speech_final for r in results if r.is_final)


@pytest.mark.nemo
@pytest.mark.slow
async def test_the_sdk_parses_sortformer_labels_and_diarization_only_sessions(tmp_path: Path) -> None:
    # Sent unpaced: under the diarizer's 8 s backlog in all, so nothing is skipped.
    audio, script = encode(utterances(3, words=2, gap_s=1.05))
    async with fake_speech() as (_fake, endpoint), appliance(tmp_path, upstream=endpoint) as app:
        results = check_parsed(await sdk_stream(app, audio, diarize=True, **ASK))
        words = [w for r in results if r.is_final for w in r.channel.alternatives[0].words]
        assert [w.word for w in words] == [s.text for s in script]
        # Random weights under a loaded CPU may label nothing in time (EDGE_LABEL_WAIT_MS):
        # what is labelled is numbered by first appearance in the transcript.
        labelled = [w.speaker for w in words if w.speaker is not None]
        assert not labelled or labelled[0] == 0
        assert sorted(set(labelled)) == list(range(len(set(labelled))))
    async with appliance(tmp_path, upstream=None) as app:
        received = await sdk_stream(app, audio, diarize=True, **ASK)
        check_parsed(received)
        turns = await sdk_stream(app, audio, diarize=True, request_options={
            "additional_query_parameters": {"speaker_turns": "true"}})
    # Asked for: SpeakerTurns arrive (the SDK cannot parse them: None), and only then.
    assert None in turns
