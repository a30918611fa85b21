"""End of speech (edge/endpoint.py): speech_final and UtteranceEnd from timings alone."""

from __future__ import annotations

from edge.endpoint import EndOfSpeech, Final, UtteranceEnd


def words(eos: EndOfSpeech[str], name: str, start: float, end: float, heard: float) -> None:
    """A final whose words span [start, end), the upstream having heard up to `heard`."""
    eos.speech(start, end)
    eos.heard(heard)
    eos.final(name, (start, end))


def names(out: list[Final[str] | UtteranceEnd]) -> list[str]:
    return [f"{o.item}:{o.speech_final}" if isinstance(o, Final) else f"UE@{round(o.last_word_end, 3)}"
            for o in out]


def test_speech_final_only_on_the_final_followed_by_endpointing_silence() -> None:
    eos: EndOfSpeech[str] = EndOfSpeech(0.3, None)
    words(eos, "a", 0.0, 1.0, heard=1.1)  # 0.1 s heard after: not decidable yet
    assert eos.ready() == []
    eos.speech(1.2, 1.5)  # the next word 0.2 s later: a short pause
    assert names(eos.ready()) == ["a:False"]
    words(eos, "b", 1.2, 2.0, heard=2.0)
    eos.heard(2.31)
    assert names(eos.ready()) == ["b:True"]


def test_default_endpointing_decides_at_once_when_the_final_ends_after_silence() -> None:
    eos: EndOfSpeech[str] = EndOfSpeech(0.01, None)
    words(eos, "a", 0.0, 1.0, heard=1.3)  # Google's final ends 0.3 s after its last word
    assert names(eos.ready()) == ["a:True"]


def test_endpointing_off_never_speech_final() -> None:
    eos: EndOfSpeech[str] = EndOfSpeech(None, None)
    words(eos, "a", 0.0, 1.0, heard=5.0)
    assert names(eos.ready()) == ["a:False"]


def test_flush_decides_with_what_is_known() -> None:
    eos: EndOfSpeech[str] = EndOfSpeech(0.5, None)
    words(eos, "a", 0.0, 1.0, heard=1.2)
    assert eos.ready() == []
    assert names(eos.flush()) == ["a:False"]
    words(eos, "b", 2.0, 3.0, heard=3.0)
    eos.heard(3.6)  # the end of the audio
    assert names(eos.flush()) == ["b:True"]


def test_one_utterance_end_per_long_gap_before_the_next_groups_finals() -> None:
    eos: EndOfSpeech[str] = EndOfSpeech(0.5, 1.0)
    out = []
    # group 1: two finals with a short pause between them
    words(eos, "g1a", 0.0, 1.0, heard=1.3)
    out += eos.ready()
    words(eos, "g1b", 1.4, 2.0, heard=2.3)
    out += eos.ready()
    eos.heard(2.9)
    out += eos.ready()  # 0.9 s after the last word: no gap yet
    # group 2 starts 1.5 s after group 1's last word; its interim words arrive first
    eos.speech(3.5, 3.8)
    eos.heard(3.8)
    out += eos.ready()
    words(eos, "g2", 3.5, 4.0, heard=4.3)
    out += eos.ready()
    eos.heard(10.0)  # a long silence: one UtteranceEnd, however often asked
    out += eos.ready() + eos.ready() + eos.flush()
    assert names(out) == ["g1a:False", "g1b:True", "UE@2.0", "g2:True", "UE@4.0"]


def test_utterance_end_waits_for_unfinalized_speech_after_the_last_word() -> None:
    eos: EndOfSpeech[str] = EndOfSpeech(0.01, 1.0)
    words(eos, "a", 0.0, 1.0, heard=1.3)
    assert names(eos.ready()) == ["a:True"]
    eos.speech(1.5, 1.9)  # a cough nobody finalizes
    eos.heard(2.5)
    assert eos.ready() == []  # 0.6 s after the cough
    eos.heard(2.95)
    assert names(eos.ready()) == ["UE@1.0"]


def test_utterance_end_comes_from_a_long_gap_even_when_the_next_final_is_held() -> None:
    eos: EndOfSpeech[str] = EndOfSpeech(0.5, 1.0)
    words(eos, "a", 0.0, 1.0, heard=1.6)
    assert names(eos.ready()) == ["a:True"]
    words(eos, "b", 3.0, 3.5, heard=3.6)  # b's own speech_final is not known yet
    assert names(eos.ready()) == ["UE@1.0"]
    eos.heard(4.0)
    assert names(eos.ready()) == ["b:True"]


def test_a_final_without_words_is_never_speech_final() -> None:
    eos: EndOfSpeech[str] = EndOfSpeech(0.01, 1.0)
    eos.heard(5.0)
    eos.final("empty", None)
    assert names(eos.flush()) == ["empty:False"]


def test_no_utterance_end_for_a_word_whose_successor_is_held() -> None:
    eos: EndOfSpeech[str] = EndOfSpeech(0.5, 1.0)
    words(eos, "a", 0.0, 1.0, heard=1.6)
    assert names(eos.ready()) == ["a:True"]
    words(eos, "b", 1.4, 2.0, heard=2.1)  # a short pause, then b: held (0.1 s heard after)
    eos.speech(3.6, 3.6)  # the next group begins 1.6 s after b
    assert names(eos.ready()) == ["b:True", "UE@2.0"]  # b first, then its UtteranceEnd


def test_words_without_a_final_do_not_end_an_utterance() -> None:
    eos: EndOfSpeech[str] = EndOfSpeech(0.01, 1.0)
    eos.heard(5.0)
    eos.speech(1.0, 2.0)  # interim words, never finalized: no UtteranceEnd for them
    assert eos.ready() == []
    eos.final("empty", None)
    assert names(eos.flush()) == ["empty:False"]


def test_diarization_only_runs_of_speech_from_the_timeline() -> None:
    """The diarizer as voice detector: Sortformer frames for word groups with short (0.16 s)
    and long (1.6 s) pauses -> one final per group, each speech-final, one UtteranceEnd per
    long pause after that group's final and before the next one's."""
    import numpy as np

    from edge.clock import FRAME_S
    from edge.diarization.timeline import SpeakerTimeline
    from edge.endpoint import VoiceRuns

    # (speaker or None, frames): group 1 = two words with a short pause; group 2 one word.
    script = [(None, 5), (0, 10), (None, 2), (0, 8), (None, 20), (1, 12), (None, 20)]
    frames = []
    for speaker, n in script:
        row = np.full(4, 0.05, np.float32)
        if speaker is not None:
            row[speaker] = 0.95
        frames += [row] * n
    timeline = SpeakerTimeline()
    runs = VoiceRuns(FRAME_S, 0.32)
    eos: EndOfSpeech[str] = EndOfSpeech(0.3, 1.0)
    out: list[Final[str] | UtteranceEnd] = []
    for i in range(0, len(frames), 7):  # frames arrive in steps, as the worker returns them
        timeline.add(i, np.stack(frames[i:i + 7]))
        first, voiced = timeline.voiced(runs.next_frame)
        for kind, start, end in runs.feed(first, voiced.tolist(), eos):
            if kind == "run":
                eos.final(f"{start:.2f}-{end:.2f}", (start, end))
        eos.heard(timeline.covered_until)
        out += eos.ready()
    out += eos.flush()
    assert names(out) == ["0.40-2.00:True", "UE@2.0", "3.60-4.56:True", "UE@4.56"]
