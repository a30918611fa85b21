"""Speaker numbers for a channel's words: who said each word, as the client sees it.

A **speaker** is the number a client sees: 0, 1, ... in order of first appearance in the
transcript, stable for the session. The numbers come from one of two sources, as the session's
plan says (`Plan.labels`): Google's own speaker **labels** (strings), or the local diarizer's
timeline (its speakers, placed on the session clock).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edge.messages import word_entry
from edge.stt.base import Word

if TYPE_CHECKING:
    from edge.diarization.session import DiarizerSession
    from edge.plan import LabelSource


class SpeakerNumbers:
    """A channel's speaker numbers: 0, 1, ... in order of first appearance in the transcript
    (diarization-only, where there is none: in order of first turn). Keys are the labeller's
    own ids (Google's label, the timeline's speaker)."""

    def __init__(self) -> None:
        self._numbers: dict[object, int] = {}

    def number(self, key: object) -> int:
        """The number of `key`, giving it the next one if it has none yet."""
        return self._numbers.setdefault(key, len(self._numbers))

    def known(self, key: object) -> int | None:
        """The number of `key`, or None if it has none yet (nothing is given)."""
        return self._numbers.get(key)


def label_words(
    words: tuple[Word, ...], labels: LabelSource | None, diar: DiarizerSession | None,
    numbers: SpeakerNumbers,
) -> tuple[list[dict[str, Any]], str | None]:
    """`words` as `Results` word entries with speakers, and where the speakers came from
    ("google", "sortformer", or None when nobody labelled them).

    With `labels="sortformer"` the local diarizer's speakers count only once its timeline
    covers the last word — also after it closed or degraded, since frames already placed stay
    valid; before that, every word gets `speaker: null`. Numbers are drawn from `numbers`.
    """
    source: str | None = None
    if labels == "google":
        source = "google"
    elif (labels == "sortformer" and diar is not None and words
          and diar.timeline.covered_until >= words[-1].end):
        source = "sortformer"
    out = []
    for w in words:
        speaker: int | None = None
        conf: float | None = None
        if source == "google" and w.speaker_label is not None:
            speaker = numbers.number(w.speaker_label)
        elif source == "sortformer" and diar is not None:
            found, conf = diar.timeline.speaker_for(w.start, w.end)
            speaker = None if found is None else numbers.number(found)
        out.append(word_entry(w.word, w.start, w.end, w.confidence, w.punctuated_word,
                              speaker, conf))
    return out, source


__all__ = ["SpeakerNumbers", "label_words"]
