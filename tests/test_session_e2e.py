"""End to end: real clients -> the daemon -> the fake Google service (gRPC, the official
client) and the tiny random-weight Sortformer in the real worker process.

Random weights prove plumbing, not accuracy: which words the tiny model gives to whom is
arbitrary, and the tests check that every final word gets a speaker, that speakers are numbered
0, 1, ... in order of arrival whatever output slot the model uses, and that the words and their
times are exactly the scripted ones on the session clock.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge.client import stream_audio
from tests.fakes.google_speech import encode, fake_speech, utterances
from tests.helpers.daemon import (
    KEY,
    ROOT,
    SR,
    appliance,
    assert_words_on_the_session_clock,
    final_words,
    samples,
    url,
    words_of,
)

pytestmark = [pytest.mark.nemo, pytest.mark.slow]


async def test_chirp3_auto_labels_every_final_word_from_sortformer(tmp_path: Path) -> None:
    audio, script = encode(utterances(4, words=4))
    async with fake_speech() as (_fake, endpoint), appliance(
        tmp_path, upstream=endpoint, edge_stt_model="chirp_3", edge_stt_language="auto"
    ) as app:
        result = await stream_audio(url(app), samples(audio), SR, key=KEY, speed=8,
                                    query={"diarize": True, "speaker_turns": True})
    assert result.close_code == 1000
    # SpeakerTurns use the transcript's numbers: a turn names a speaker some earlier word
    # named, or (a voice no word ever got, at the end) one numbered after all of them.
    named: set[int] = set()
    for m in result.messages:
        if m["type"] == "Results" and m["is_final"]:
            named |= {w["speaker"] for w in m["channel"]["alternatives"][0]["words"]} - {None}
        elif m["type"] == "SpeakerTurn":
            assert m["speaker"] in named or m["speaker"] >= len(named), (m, named)
    assert result.messages[-1]["type"] == "Metadata"
    words = final_words(result.messages)
    assert_words_on_the_session_clock(words, script)
    assert all(isinstance(w["speaker"], int) and 0 <= w["speaker"] < 4 for w in words), words
    finals = [m for m in result.finals if m["channel"]["alternatives"][0]["words"]]
    assert finals and all(m["speaker_source"] == "sortformer" for m in finals)
    assert all(m["metadata"]["diarize_info"]["arch"] == "sortformer" for m in finals)


async def test_google_diarization_labels_in_arrival_order(tmp_path: Path) -> None:
    audio, script = encode(utterances(3, words=3))
    async with fake_speech() as (_fake, endpoint), appliance(
        tmp_path, upstream=endpoint, diarizer=False, edge_stt_api="v1",
        edge_stt_model="latest_long", edge_stt_language="en-US",
    ) as app:
        result = await stream_audio(url(app), samples(audio), SR, key=KEY, speed=8)
    words = final_words(result.messages)
    assert_words_on_the_session_clock(words, script)  # v1's repeated words de-duplicated
    # The fake tags word wN with speaker N % 3 + 1; we number tags by first appearance.
    order: dict[int, int] = {}
    for w, s in zip(words, script, strict=True):
        tag = s.id % 3 + 1
        assert w["speaker"] == order.setdefault(tag, len(order))
    sources = {m["speaker_source"] for m in result.finals if m["channel"]["alternatives"][0]["words"]}
    assert sources == {"google"}


async def test_no_credentials_runs_diarization_only(tmp_path: Path) -> None:
    audio, _ = encode(utterances(3))
    async with appliance(tmp_path, upstream=None) as app:
        assert app.status.ready
        assert app.status.checks["upstream"].startswith("unconfigured")
        result = await stream_audio(url(app), samples(audio), SR, key=KEY, speed=8,
                                    query={"speaker_turns": True})
        quiet = await stream_audio(url(app), samples(audio), SR, key=KEY, speed=8,
                                   query={"utterance_end_ms": 1000, "endpointing": 300})
    assert not [m for m in quiet.messages if m["type"] == "SpeakerTurn"]  # only when asked
    # End of speech from the diarizer's voice activity (random weights: whatever it hears),
    # consistent with itself: each run of speech is a final without words; an UtteranceEnd
    # names the end of the final before it, once; speech_final only when 300 ms of silence
    # follow (the next run, or the end of the audio).
    runs = [m for m in quiet.messages if m["type"] == "Results"]
    assert runs and all(m["is_final"] and not words_of(m) for m in runs)
    ends = [round(m["start"] + m["duration"], 3) for m in runs]
    for m, end, nxt in zip(runs, ends, [m["start"] for m in runs[1:]] + [quiet.sent_audio_s],
                           strict=True):
        assert m["speech_final"] is (nxt - end >= 0.3 - 0.002), (m, nxt)
    last_end = None
    seen = set()
    for m in quiet.messages:
        if m["type"] == "Results":
            last_end = round(m["start"] + m["duration"], 3)
        elif m["type"] == "UtteranceEnd":
            assert m["last_word_end"] == last_end and last_end not in seen
            seen.add(last_end)
    turns = [m for m in result.messages if m["type"] == "SpeakerTurn"]
    assert turns and any(t["is_final"] for t in turns)
    for t in turns:
        assert 0 <= t["speaker"] < 4 and 0 <= t["start"] < t["end"] <= len(audio) / 2 / SR + 0.1
    first_turns = sorted((t for t in turns if t["is_final"]), key=lambda t: t["start"])
    arrival = list(dict.fromkeys(t["speaker"] for t in first_turns))
    assert arrival == list(range(len(arrival))), arrival  # 0-based, in order of arrival
    assert result.messages[-1]["type"] == "Metadata" and result.close_code == 1000


async def test_deepgram_sdk_streams_and_parses(tmp_path: Path) -> None:
    deepgram = pytest.importorskip("deepgram")
    from deepgram.core.api_error import ApiError
    from deepgram.environment import DeepgramClientEnvironment

    # Pauses >= utterance_end_ms, and under the diarizer's 8 s backlog in all (sent unpaced).
    audio, script = encode(utterances(3, words=2, gap_s=1.05))
    async with fake_speech() as (_fake, endpoint), appliance(tmp_path, upstream=endpoint) as app:
        base = f"127.0.0.1:{app.server.port}"
        env = DeepgramClientEnvironment(base=f"http://{base}", production=f"ws://{base}",
                                        agent=f"ws://{base}", agent_rest=f"http://{base}")
        client = deepgram.AsyncDeepgramClient(api_key=KEY, environment=env)
        received: list[Any] = []
        async with client.listen.v1.connect(
            model="nova-3", encoding="linear16", sample_rate=SR, diarize=True,
            interim_results=True, utterance_end_ms=1000, vad_events=True,
        ) as conn:
            for i in range(0, len(audio), 3200):
                await conn.send_media(audio[i:i + 3200])
            await conn.send_close_stream()
            async for message in conn:
                received.append(message)
        names = [type(m).__name__ for m in received]
        assert "ListenV1Metadata" in names and "ListenV1UtteranceEnd" in names
        finals = [m for m in received if type(m).__name__ == "ListenV1Results" and m.is_final]
        words = [w for m in finals for w in m.channel.alternatives[0].words]
        assert [w.word for w in words] == [s.text for s in script]
        assert all(isinstance(w.speaker, int) for w in words)
        assert all(m.speaker_source == "sortformer" for m in finals if m.channel.alternatives[0].words)

        bad = deepgram.AsyncDeepgramClient(api_key="wrong", environment=env)
        with pytest.raises(ApiError) as err:
            async with bad.listen.v1.connect(model="nova-3", encoding="linear16", sample_rate=SR):
                pass
        assert err.value.status_code == 401


async def test_edge_stream_cli_prints_labelled_lines(tmp_path: Path) -> None:
    import soundfile as sf

    audio, script = encode(utterances(2, words=3))
    wav = tmp_path / "meeting.wav"
    sf.write(wav, samples(audio), SR, subtype="PCM_16")
    async with fake_speech() as (_fake, endpoint), appliance(tmp_path, upstream=endpoint) as app:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "edge", "stream", str(wav), "--speed", "8", "--url", url(app),
            "--key", KEY, "--jsonl", str(tmp_path / "out.jsonl"), "--rttm", str(tmp_path / "out.rttm"),
            cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={"EDGE_ENV_FILE": "/dev/null", "PATH": "/usr/bin:/bin"},
        )
        out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert lines and all(line.startswith("[") and "speaker " in line for line in lines)
    spoken = " ".join(line.split(": ", 1)[1] for line in lines).replace(".", "").split()
    assert spoken == [s.text for s in script]
    rttm = (tmp_path / "out.rttm").read_text().splitlines()
    assert rttm and all(r.startswith("SPEAKER meeting 1 ") for r in rttm)
    jsonl = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert jsonl[-1]["type"] == "Metadata"


async def test_multichannel_labels_each_channel_with_its_own_diarizer_session(
        tmp_path: Path) -> None:
    from websockets.asyncio.client import connect

    left, left_words = encode(utterances(2, words=3))
    right, right_words = encode(utterances(2, words=2, word_s=0.7, first_id=20))
    n = min(len(left), len(right)) // 2
    stereo = np.stack([samples(left)[:n], samples(right)[:n]], axis=1).reshape(-1).tobytes()
    messages: list[dict[str, Any]] = []
    async with fake_speech() as (_fake, endpoint), appliance(
        tmp_path, upstream=endpoint, edge_stt_model="chirp_3", edge_stt_language="auto"
    ) as app, connect(f"{url(app)}/v1/listen?channels=2&multichannel=true&diarize=true",
                      additional_headers={"Authorization": f"Token {KEY}"}) as ws:
        for i in range(0, len(stereo), 6400):
            await ws.send(stereo[i:i + 6400])
            await asyncio.sleep(0.025)  # 4x real time
        await ws.send(json.dumps({"type": "CloseStream"}))
        async for raw in ws:
            messages.append(json.loads(raw))
        assert app.status.diarizer["sessions"] == 0  # both channel sessions closed
    assert messages[-1]["type"] == "Metadata" and messages[-1]["channels"] == 2
    for index, script in ((0, left_words), (1, right_words)):
        finals = [m for m in messages if m["type"] == "Results" and m["is_final"]
                  and m["channel_index"] == [index, 2]]
        words = [w for m in finals for w in m["channel"]["alternatives"][0]["words"]]
        assert [w["word"] for w in words] == [s.text for s in script if s.end <= n]
        labelled = [w["speaker"] for w in words if w["speaker"] is not None]
        assert labelled, index
        # Numbered on its own: each channel's first labelled word is its speaker 0.
        assert labelled[0] == 0 and sorted(set(labelled)) == list(range(len(set(labelled))))
        assert {m["speaker_source"] for m in finals if m["channel"]["alternatives"][0]["words"]
                } <= {"sortformer", None}


async def test_diarize_false_pays_nothing_for_the_diarizer(tmp_path: Path) -> None:
    audio, script = encode(utterances(2, words=3))
    opened: list[int] = []
    async with fake_speech() as (_fake, endpoint), appliance(tmp_path, upstream=endpoint) as app:

        def watch(_msg: dict[str, Any]) -> None:
            opened.append(app.status.diarizer["sessions"])

        result = await stream_audio(url(app), samples(audio), SR, key=KEY, speed=8,
                                    query={"diarize": False}, on_message=watch)
    assert opened and set(opened) == {0}  # no diarizer session was ever held for it
    words = final_words(result.messages)
    assert_words_on_the_session_clock(words, script)
    assert all(w["speaker"] is None for w in words)
    assert {m["type"] for m in result.messages} == {"Results", "Metadata"}  # no Error
    assert all(m["speaker_source"] is None and "speaker_note" not in m for m in result.finals)
