#!/usr/bin/env python3
"""Synthesize a multi-speaker meeting with espeak-ng voices: WAV, reference RTTM, word transcript.

Speakers take turns of a sentence or two, with pauses between turns and, now and then, a turn
that starts before the last one ends (overlap). Each word is synthesized on its own so its
time in the transcript is exact; the reference RTTM has one line per turn (first word's start
to last word's end). The same seed gives the same files, byte for byte.

For demos (`edge stream`, `edge eval`) and tests. It is synthetic speech: a trained model's
score on it says little about real rooms, and random test weights score badly on it.

    python scripts/make_meeting.py --out /tmp/meet --seconds 60 --speakers 3 --seed 1
    # -> /tmp/meet/meeting.wav (16 kHz mono), meeting.rttm, meeting.words.tsv
"""

from __future__ import annotations

import argparse
import io
import itertools
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
import soxr

RATE = 16000
# espeak-ng voice+variant, pitch (0-99), words per minute: far enough apart to tell by ear.
VOICES = [("en-us+m3", 35, 185), ("en-gb+f3", 70, 195), ("en-gb-scotland+m1", 50, 175),
          ("en-us+f4", 85, 200)]
SENTENCES = [
    "Let us start with the budget for next quarter.",
    "I think the numbers look better than last month.",
    "Can we move the review to Thursday afternoon?",
    "The new room devices arrived this morning.",
    "We still need a decision on the vendor.",
    "Could you send me the slides after the call?",
    "That sounds fine to me.",
    "I disagree, the timeline is too tight.",
    "Who is taking notes today?",
    "The customer asked for a demo next week.",
    "Let me check the calendar and get back to you.",
    "We should test it in the large meeting room first.",
    "The microphones pick up a lot of echo in there.",
    "Good point, we can add that to the list.",
    "I will follow up with the team tomorrow.",
    "Does anyone have questions before we move on?",
    "The latency was under one second in every test.",
    "Please update the ticket when you are done.",
    "Right, so the next item is hiring.",
    "We have two candidates for the support role.",
]
OVERLAP_PROB = 0.3  # a turn starts before the previous one ends
WORD_GAP_S = (0.02, 0.08)
PAUSE_S = (0.25, 1.3)
OVERLAP_S = (0.3, 1.0)


Turn = tuple[str, float, float]  # speaker, start, end


@dataclass
class Word:
    start: float
    end: float
    speaker: str
    text: str


def synthesize(word: str, voice: tuple[str, int, int]) -> np.ndarray:
    """One word as float32 mono at 16 kHz, leading and trailing silence trimmed."""
    name, pitch, wpm = voice
    out = subprocess.run(["espeak-ng", "-v", name, "-p", str(pitch), "-s", str(wpm), "--stdout", word],
                         capture_output=True, check=True).stdout
    audio, rate = soundfile.read(io.BytesIO(out), dtype="float32")
    audio = soxr.resample(audio, rate, RATE, quality="HQ").astype(np.float32)
    loud = np.flatnonzero(np.abs(audio) > 0.02 * max(1e-9, float(np.abs(audio).max())))
    return audio[loud[0]:loud[-1] + 1] if loud.size else audio[:0]


def make(seconds: float, speakers: int, seed: int) -> tuple[np.ndarray, list[Word], list[Turn]]:
    """The meeting's samples, its words and its turns (speaker, start, end)."""
    rng = random.Random(seed)
    cache: dict[tuple[int, str], np.ndarray] = {}
    words: list[Word] = []
    turns: list[Turn] = []
    pieces: list[tuple[int, np.ndarray]] = []
    t, last = 0.5, -1
    while t < seconds - 2.0:
        who = rng.choice([s for s in range(speakers) if s != last])
        text = " ".join(rng.sample(SENTENCES, rng.choice((1, 1, 1, 2))))
        start = cursor = t
        for token in text.split():
            clean = token.strip(".,?!").lower()
            if (who, clean) not in cache:
                cache[who, clean] = synthesize(clean, VOICES[who])
            audio = cache[who, clean]
            pieces.append((round(cursor * RATE), audio))
            words.append(Word(cursor, cursor + audio.size / RATE, f"spk{who}", clean))
            cursor = words[-1].end + rng.uniform(*WORD_GAP_S)
        end = words[-1].end
        turns.append((f"spk{who}", start, end))
        last = who
        if rng.random() < OVERLAP_PROB:
            t = max(start + 0.5, end - rng.uniform(*OVERLAP_S))
        else:
            t = end + rng.uniform(*PAUSE_S)
    total = max(int(seconds * RATE), max(at + a.size for at, a in pieces) + RATE // 2)
    mix = np.zeros(total, dtype=np.float32)
    for at, audio in pieces:
        mix[at:at + audio.size] += 0.5 * audio
    mix /= max(1.0, float(np.abs(mix).max()) / 0.9)
    return mix, sorted(words, key=lambda w: w.start), turns


def write(out: Path, name: str, mix: np.ndarray, words: list[Word], turns: list[Turn]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    soundfile.write(out / f"{name}.wav", mix, RATE, subtype="PCM_16")
    (out / f"{name}.rttm").write_text("".join(
        f"SPEAKER {name} 1 {s:.3f} {e - s:.3f} <NA> <NA> {who} <NA> <NA>\n" for who, s, e in turns))
    (out / f"{name}.words.tsv").write_text("start\tend\tspeaker\tword\n" + "".join(
        f"{w.start:.3f}\t{w.end:.3f}\t{w.speaker}\t{w.text}\n" for w in words))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--name", default="meeting", help="file names and RTTM uri (default meeting)")
    parser.add_argument("--seconds", type=float, default=60.0, help="length (default 60)")
    parser.add_argument("--speakers", type=int, default=3, help=f"2-{len(VOICES)} (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 2 <= args.speakers <= len(VOICES):
        parser.error(f"--speakers {args.speakers}: allowed 2-{len(VOICES)}")
    if args.seconds < 5:
        parser.error(f"--seconds {args.seconds}: allowed >= 5")
    if shutil.which("espeak-ng") is None:
        print("make_meeting: espeak-ng is not installed (apt-get install espeak-ng)", file=sys.stderr)
        return 1
    mix, words, turns = make(args.seconds, args.speakers, args.seed)
    write(args.out, args.name, mix, words, turns)
    overlap = sum(max(0.0, min(a[2], b[2]) - b[1]) for a, b in itertools.pairwise(turns))
    print(f"{args.out / args.name}.wav: {mix.size / RATE:.1f} s, {len(turns)} turns, {len(words)} words, "
          f"{overlap:.1f} s overlapped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
