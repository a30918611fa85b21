"""Deepgram's semantics end to end: real clients -> the daemon -> the fake Google service.

End of speech (speech_final, UtteranceEnd), interim Results as whole hypotheses, multichannel,
and what each plan sends. Word groups are scripted with the fake's word code, so every time
checked here is exact on the session clock. Diarization-only mode (the Sortformer as voice
detector) is in test_semantics_diarizer.py (it needs NeMo).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.client import connect

from edge.client import stream_audio
from tests.fakes.google_speech import encode, fake_speech
from tests.helpers.daemon import KEY, running_app, url, with_fake_google, words_of
from tests.helpers.end_of_speech import GROUPS, check_groups, end_of_speech_sequence

SR = 16000


async def test_end_of_speech_marks_each_word_group_with_the_google_upstream() -> None:
    audio, script = encode(GROUPS)
    async with with_fake_google() as app:
        result = await stream_audio(url(app), np.frombuffer(audio, "<i2"), SR, key=KEY, speed=4,
                                    query={"diarize": False, "endpointing": 500,
                                           "utterance_end_ms": 1000, "interim_results": True,
                                           "vad_events": True})
    assert result.close_code == 1000 and result.messages[-1]["type"] == "Metadata"
    seq = end_of_speech_sequence(result.messages)
    check_groups(seq, script)
    assert [w for s in seq if s[0] == "F" for w in s[1]] == [w.text for w in script]
    started = [m["timestamp"] for m in result.messages if m["type"] == "SpeechStarted"]
    assert started and started[0] == pytest.approx(script[0].start / SR, abs=0.002)
    # Interim Results: each the whole hypothesis of its segment (the fake sends Google's
    # stable and unstable parts apart): a prefix of the final that follows it.
    finals_after: list[list[str]] = []
    pending: list[list[str]] = []
    for m in result.messages:
        if m["type"] != "Results" or not words_of(m):
            continue
        if m["is_final"]:
            finals_after += [[w["word"] for w in words_of(m)] for _ in pending]
            pending = []
        else:
            assert m["speech_final"] is False
            pending.append([w["word"] for w in words_of(m)])
            assert m["channel"]["alternatives"][0]["transcript"] == " ".join(pending[-1])
    interims = [[w["word"] for w in words_of(m)] for m in result.messages
                if m["type"] == "Results" and not m["is_final"] and words_of(m)]
    assert ["w6", "w7"] in interims  # both parts of one hypothesis in one message
    for interim, final in zip(interims, finals_after, strict=False):
        assert final[:len(interim)] == interim


@pytest.mark.parametrize(("endpointing", "expected"), [(None, True), ("false", False)])
async def test_speech_final_follows_default_endpointing_and_never_comes_when_off(
    endpointing: str | None, expected: bool,
) -> None:
    audio, _ = encode(GROUPS)
    query: dict[str, Any] = {"diarize": False}
    if endpointing is not None:
        query["endpointing"] = endpointing
    async with with_fake_google() as app:
        result = await stream_audio(url(app), np.frombuffer(audio, "<i2"), SR, key=KEY, speed=8,
                                    query=query)
    finals = [m for m in result.finals if words_of(m)]
    # Every final the fake makes is followed by >= 0.3 s of silence: >= 10 ms (the default).
    assert finals and all(m["speech_final"] is expected for m in finals)
    types = {m["type"] for m in result.messages}
    assert types <= {"Results", "Metadata"}  # nothing the client did not ask for


async def test_finalize_answers_with_from_finalize() -> None:
    audio, _ = encode([(0, 0.3), (1, 0.5), (2, 0.5)])  # speech still going: no final yet
    async with with_fake_google() as app, connect(
            f"{url(app)}/v1/listen?diarize=false&endpointing=300",
            additional_headers={"Authorization": f"Token {KEY}"}) as ws:
        await ws.send(audio)
        await ws.send(json.dumps({"type": "Finalize"}))
        while True:
            m = json.loads(await asyncio.wait_for(ws.recv(), 10))
            if m["type"] == "Results":
                break
        assert m["is_final"] and m["from_finalize"] is True
        assert [w["word"] for w in words_of(m)] == ["w1", "w2"]
        await ws.send(json.dumps({"type": "CloseStream"}))


async def test_multichannel_stereo_gives_a_results_stream_per_channel() -> None:
    left, left_words = encode([(0, 0.3), (1, 0.5), (2, 0.4), (0, 0.8), (3, 0.6), (0, 1.0)])
    right, right_words = encode([(0, 1.0), (7, 0.3), (0, 0.4), (8, 0.3), (9, 0.5), (0, 1.1)])
    n = min(len(left), len(right)) // 2
    stereo = np.stack([np.frombuffer(left, "<i2")[:n], np.frombuffer(right, "<i2")[:n]], axis=1)
    messages: list[dict[str, Any]] = []
    # v1 with Google's diarization: the fake tags word wN as speaker N % 3 + 1.
    async with with_fake_google(edge_stt_api="v1", edge_stt_language="en-US",
                      edge_stt_model="latest_long") as app, connect(
            f"{url(app)}/v1/listen?channels=2&multichannel=true&diarize=true&utterance_end_ms=1000",
            additional_headers={"Authorization": f"Token {KEY}"}) as ws:
        data = stereo.reshape(-1).tobytes()
        for i in range(0, len(data), 6400):
            await ws.send(data[i:i + 6400])
        await ws.send(json.dumps({"type": "CloseStream"}))
        async for raw in ws:
            messages.append(json.loads(raw))
    assert messages[-1]["type"] == "Metadata" and messages[-1]["channels"] == 2
    for index, script in ((0, left_words), (1, right_words)):
        finals = [m for m in messages if m["type"] == "Results" and m["is_final"]
                  and m["channel_index"] == [index, 2] and words_of(m)]
        words = [w for m in finals for w in words_of(m)]
        assert [w["word"] for w in words] == [s.text for s in script]
        for w, s in zip(words, script, strict=True):
            assert w["start"] == pytest.approx(s.start / SR, abs=0.002)
        # Each channel numbers its own speakers from 0, in order of first appearance.
        order: dict[int, int] = {}
        assert [w["speaker"] for w in words] == [
            order.setdefault(s.id % 3 + 1, len(order)) for s in script]
        ends = [m["last_word_end"] for m in messages
                if m["type"] == "UtteranceEnd" and m["channel"] == [index, 2]]
        assert ends == [pytest.approx(script[-1].end / SR, abs=0.002)]
    assert {tuple(m["channel_index"]) for m in messages if m["type"] == "Results"} == {(0, 2), (1, 2)}


async def test_language_multi_asks_google_for_its_multilingual_mode() -> None:
    audio, _ = encode([(0, 0.3), (1, 0.5), (0, 0.5)])
    async with fake_speech() as (fake, endpoint), running_app(
            edge_stt_endpoint=endpoint, edge_stt_insecure=True, edge_stt_language="en-US") as app:
        await stream_audio(url(app), np.frombuffer(audio, "<i2"), SR, key=KEY, fast=True,
                           query={"language": "multi", "diarize": False})
    assert list(fake.calls[0].config.config.language_codes) == ["auto"]
