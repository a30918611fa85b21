"""edge/client.py's rendering and reading, without a daemon (the streaming itself runs against
real daemons in test_session_e2e.py and test_semantics.py)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge import client
from edge.query import MAX_RATE, MIN_RATE


def word(text: str, start: float, end: float, speaker: int | None) -> dict[str, Any]:
    return {"word": text, "punctuated_word": text.capitalize(), "start": start, "end": end,
            "speaker": speaker}


def results(words: list[dict[str, Any]], is_final: bool = True) -> dict[str, Any]:
    return {"type": "Results", "is_final": is_final, "channel": {"alternatives": [{"words": words}]}}


def turn(start: float, end: float, speaker: int, is_final: bool = True) -> dict[str, Any]:
    return {"type": "SpeakerTurn", "start": start, "end": end, "speaker": speaker,
            "is_final": is_final}


def shown(msg: dict[str, Any]) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    client.show(msg, out, err)
    return out.getvalue(), err.getvalue()


def test_show_prints_finals_turns_and_errors_only() -> None:
    final = results([word("hello", 1.0, 1.4, 0), word("there", 1.5, 1.9, 0),
                     word("hi", 2.5, 2.7, 1), word("um", 3.0, 3.1, None)])
    assert shown(final) == ("[1.0s] speaker 0: Hello There\n[2.5s] speaker 1: Hi\n"
                            "[3.0s] speaker ?: Um\n", "")
    assert shown(turn(0.0, 2.56, 1)) == ("[0.0s-2.6s] speaker 1\n", "")
    assert shown({"type": "Error", "description": "bad frame"}) == (
        "", "edge: daemon says: bad frame\n")
    for quiet in (results([word("hel", 1.0, 1.2, 0)], is_final=False), turn(0, 1, 0, False),
                  {"type": "Metadata", "duration": 3.0}):
        assert shown(quiet) == ("", "")


def test_rttm_comes_from_final_speaker_turns_when_there_are_any() -> None:
    messages = [turn(0.0, 1.25, 0), turn(1.25, 2.0, 1, is_final=False), turn(1.5, 3.0, 1),
                results([word("a", 0.1, 0.2, 0)])]
    assert client.rttm_from_messages(messages, "m") == [
        "SPEAKER m 1 0.000 1.250 <NA> <NA> speaker_0 <NA> <NA>",
        "SPEAKER m 1 1.500 1.500 <NA> <NA> speaker_1 <NA> <NA>",
    ]


def test_rttm_from_words_merges_one_speakers_close_words() -> None:
    messages = [
        results([word("a", 0.0, 0.4, 0), word("b", 0.8, 1.0, 0),  # 0.4 s apart: one segment
                 word("c", 1.5, 1.7, 0),  # 0.5 s after: a new one
                 word("d", 1.8, 2.0, None),  # unlabelled: left out
                 word("e", 2.1, 2.5, 1)]),
        results([word("x", 9.0, 9.5, 0)], is_final=False),  # interim: left out
    ]
    assert client.rttm_from_messages(messages, "f") == [
        "SPEAKER f 1 0.000 1.000 <NA> <NA> speaker_0 <NA> <NA>",
        "SPEAKER f 1 1.500 0.200 <NA> <NA> speaker_0 <NA> <NA>",
        "SPEAKER f 1 2.100 0.400 <NA> <NA> speaker_1 <NA> <NA>",
    ]


@pytest.mark.parametrize("rate", [MIN_RATE - 1, MAX_RATE + 1])
def test_read_audio_refuses_a_rate_the_daemon_does_not_take(tmp_path: Path, rate: int) -> None:
    import soundfile as sf

    path = tmp_path / "odd.wav"
    sf.write(str(path), np.zeros(rate // 10, dtype=np.int16), rate)
    with pytest.raises(ValueError, match=f"sample rate {rate} Hz is outside "
                                         f"{MIN_RATE}-{MAX_RATE} Hz"):
        client.read_audio(path)


def test_read_audio_averages_channels(tmp_path: Path) -> None:
    import soundfile as sf

    path = tmp_path / "stereo.wav"
    sf.write(str(path), np.array([[100, 300], [-200, -400]], dtype=np.int16), MIN_RATE)
    samples, rate = client.read_audio(path)
    assert rate == MIN_RATE and samples.tolist() == [200, -300]
