"""The scripted word groups of the end-of-speech tests (speech_final, UtteranceEnd) and their
check, shared by the daemon's own test and the SDKs' tests of the same script."""

from __future__ import annotations

from typing import Any

import pytest

from tests.fakes.google_speech import ScriptWord
from tests.helpers.daemon import words_of

SR = 16000
SHORT, LONG = 0.4, 1.6  # pauses: shorter than endpointing=500, longer than utterance_end_ms
# Three groups: finals come from the fake's own endpointer (0.3 s of silence), so groups 1
# and 2 have several finals each, group 3 (a 0.2 s pause) one.
GROUPS = [(0, 0.6), (1, 0.5), (0, SHORT), (2, 0.5), (0, SHORT), (3, 0.5), (0, LONG),
          (4, 0.5), (0, SHORT), (5, 0.5), (0, LONG),
          (6, 0.5), (0, 0.2), (7, 0.5), (0, 2.0)]
GROUP_OF = {1: 0, 2: 0, 3: 0, 4: 1, 5: 1, 6: 2, 7: 2}


def end_of_speech_sequence(messages: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """Finals with words as ("F", [word texts], speech_final), UtteranceEnds as ("UE", t)."""
    out: list[tuple[Any, ...]] = []
    for m in messages:
        if m["type"] == "Results" and m["is_final"] and words_of(m):
            out.append(("F", [w["word"] for w in words_of(m)], m["speech_final"]))
        elif m["type"] == "UtteranceEnd":
            out.append(("UE", m["last_word_end"]))
    return out


def check_groups(seq: list[tuple[Any, ...]], script: list[ScriptWord]) -> None:
    """speech_final exactly on each group's last final; one UtteranceEnd per long pause (and
    the trailing silence), after that group's finals and before the next group's, with the
    group's last word's end."""
    last_word = {GROUP_OF[w.id]: w for w in script}
    group = 0
    for i, item in enumerate(seq):
        if item[0] == "UE":
            assert item[1] == pytest.approx(last_word[group].end / SR, abs=0.002), (seq, i)
            assert seq[i - 1][0] == "F" and seq[i - 1][2] is True, (seq, i)
            group += 1
            continue
        ids = {GROUP_OF[int(w[1:])] for w in item[1]}
        assert ids == {group}, (seq, i)  # never a final of the next group before the UE
        closes = int(item[1][-1][1:]) == last_word[group].id
        assert item[2] is closes, (seq, i)
    assert group == 3, seq
    assert sum(1 for s in seq if s[0] == "UE") == 3
