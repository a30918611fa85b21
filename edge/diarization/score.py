"""Score diarization: RTTM and UEM files in, pyannote.metrics' DER (and its parts) and JER out.

`edge eval` uses this. The numbers are pyannote.metrics' own (`DiarizationErrorRate`,
`JaccardErrorRate`); this module only reads the files, with errors that name the file and
line, and lays the results out per file (RTTM `uri`) and in total. Nothing here imports torch.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pyannote.core import Annotation, Segment, Timeline

RTTM_SUFFIX = ".rttm"
# The other record types of NIST's RTTM: they carry no speaker turn, so they are skipped.
NIST_TYPES = frozenset({"SEGMENT", "NOSCORE", "NO_RT_METADATA", "LEXEME", "NON-LEX", "NON-SPEECH",
                        "FILLER", "EDIT", "IP", "SU", "CB", "A/P", "SPKR-INFO"})


class ScoreError(ValueError):
    """What `edge eval` cannot score: bad input (the message names the file, and the line where
    there is one), or a hypothesis that could not be had (a daemon that refused). One line."""


@dataclass
class Rttm:
    """The speaker turns of one or more RTTM files: an `Annotation` per uri, and where each
    uri was first seen (`file:line`), for messages."""

    turns: dict[str, Annotation]
    where: dict[str, str]
    source: Path


@dataclass(frozen=True)
class Score:
    """One file's (or the total's) result. Rates are fractions of reference speech."""

    der: float
    jer: float
    miss: float
    false_alarm: float
    confusion: float
    speech_s: float


@dataclass(frozen=True)
class Report:
    """Per-uri scores, in reference order, and the total over all of them."""

    files: dict[str, Score]
    total: Score

    def to_json(self) -> dict[str, Any]:
        """The `--json` object: the total's keys, plus `files` holding the same per uri."""
        return {**_rounded(self.total), "files": {uri: _rounded(s) for uri, s in self.files.items()}}


def read_rttm(path: Path, known: Rttm | None = None) -> Rttm:
    """Read `path`: one RTTM file, or every `*.rttm` in a directory (sorted by name).

    Only `SPEAKER` lines count; blank lines and `#` / `;;` comments are skipped, as are the other
    NIST record types. With `known` (the reference), every uri must be one of its uris. Raises
    `ScoreError` for a missing file, a malformed line, a uri found in two files, or an unknown uri.
    """
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == RTTM_SUFFIX and p.is_file())
        if not files:
            raise ScoreError(f"{path}: no *{RTTM_SUFFIX} files in this directory")
    elif path.is_file():
        files = [path]
    else:
        raise ScoreError(f"{path}: no such file or directory")
    out = Rttm({}, {}, path)
    for file in files:
        seen_here: set[str] = set()
        for lineno, uri, segment, label in _speaker_lines(file):
            where = f"{file}:{lineno}"
            if known is not None and uri not in known.turns:
                raise ScoreError(f"{where}: uri {uri!r} is not in the reference {known.source} "
                                 f"(it has: {', '.join(sorted(known.turns)) or 'nothing'})")
            if uri in out.where and uri not in seen_here:
                raise ScoreError(f"{where}: uri {uri!r} is also in {out.where[uri]}")
            if uri not in out.turns:
                out.turns[uri] = Annotation(uri=uri)
                out.where[uri] = where
            seen_here.add(uri)
            out.turns[uri][segment, len(out.turns[uri])] = label
    return out


def _speaker_lines(file: Path) -> list[tuple[int, str, Segment, str]]:
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ScoreError(f"{file}: cannot read: {exc}") from exc
    lines = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0].startswith(("#", ";;")):
            continue
        if fields[0] != "SPEAKER":
            if fields[0] in NIST_TYPES:
                continue
            raise ScoreError(f"{file}:{lineno}: not an RTTM line (expected 'SPEAKER uri channel "
                             f"onset duration <NA> <NA> speaker ...'): {line.strip()[:80]!r}")
        if len(fields) < 8:
            raise ScoreError(f"{file}:{lineno}: a SPEAKER line needs at least 8 fields "
                             f"(type uri channel onset duration ortho stype speaker), got {len(fields)}")
        onset = _seconds(fields[3], "onset", file, lineno)
        duration = _seconds(fields[4], "duration", file, lineno)
        lines.append((lineno, fields[1], Segment(onset, onset + duration), fields[7]))
    return lines


def _seconds(text: str, name: str, file: Path, lineno: int) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ScoreError(f"{file}:{lineno}: {name} {text!r} is not a number of seconds >= 0")
    return value


def read_uem(path: Path, reference: Rttm) -> dict[str, Timeline]:
    """Read a UEM file (`uri channel start end` per line): the scored regions per uri.

    Every reference uri must have a region; uris the reference lacks are ignored (one UEM often
    covers a whole corpus). Raises `ScoreError` naming the file and line.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ScoreError(f"{path}: cannot read: {exc}") from exc
    regions: dict[str, list[Segment]] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0].startswith(("#", ";;")):
            continue
        if len(fields) != 4:
            raise ScoreError(f"{path}:{lineno}: a UEM line is 'uri channel start end', got "
                             f"{len(fields)} fields")
        start = _seconds(fields[2], "start", path, lineno)
        end = _seconds(fields[3], "end", path, lineno)
        if end <= start:
            raise ScoreError(f"{path}:{lineno}: end {fields[3]} is not after start {fields[2]}")
        regions.setdefault(fields[0], []).append(Segment(start, end))
    missing = [uri for uri in reference.turns if uri not in regions]
    if missing:
        raise ScoreError(f"{path}: no region for reference uri {missing[0]!r} "
                         f"(from {reference.where[missing[0]]})")
    return {uri: Timeline(segments, uri=uri).support() for uri, segments in regions.items()}


def check_reference(reference: Rttm) -> None:
    """Raise `ScoreError` when the reference holds no speech at all (nothing to score against)."""
    if not reference.turns or not any(a.get_timeline().duration() > 0 for a in reference.turns.values()):
        raise ScoreError(f"{reference.source}: the reference has no SPEAKER turns longer than 0 s; "
                         f"an empty reference cannot be scored")


def score(
    reference: Rttm,
    hypothesis: dict[str, Annotation],
    *,
    collar: float = 0.0,
    skip_overlap: bool = False,
    uem: dict[str, Timeline] | None = None,
) -> Report:
    """Score `hypothesis` (an `Annotation` per uri; a missing uri counts as no speech found)
    against `reference` with pyannote.metrics.

    `collar` is pyannote's: seconds around each reference boundary left out, half before and half
    after. Without `uem` the scored region is what pyannote approximates (the extent of reference
    and hypothesis). Returns a `Report`. Raises `ScoreError` for an empty reference, or a file
    whose scored region holds no reference speech.
    """
    from pyannote.metrics.diarization import DiarizationErrorRate, JaccardErrorRate

    check_reference(reference)
    der = DiarizationErrorRate(collar=collar, skip_overlap=skip_overlap)
    jer = JaccardErrorRate(collar=collar, skip_overlap=skip_overlap)
    files: dict[str, Score] = {}
    for uri, ref in reference.turns.items():
        hyp = hypothesis.get(uri, Annotation(uri=uri))
        region = uem.get(uri) if uem is not None else None
        with warnings.catch_warnings():
            # "'uem' was approximated by the union of 'reference' and 'hypothesis' extents"
            # is what we document, not news at every file.
            warnings.filterwarnings("ignore", message="'uem' was approximated")
            parts = der(ref, hyp, uem=region, detailed=True)
            jer_parts = jer(ref, hyp, uem=region, detailed=True)
        if parts["total"] <= 0:
            raise ScoreError(f"{reference.where[uri]}: uri {uri!r} has no reference speech "
                             f"{'inside the UEM' if region is not None else 'to score'}")
        files[uri] = _score(parts, jer_parts["jaccard error rate"])
    total = _score(der.accumulated_, abs(jer))
    return Report(files, total)


def _score(parts: Any, jer: float) -> Score:
    speech = parts["total"]
    miss, fa, conf = parts["missed detection"], parts["false alarm"], parts["confusion"]
    return Score(der=(miss + fa + conf) / speech, jer=jer, miss=miss / speech,
                 false_alarm=fa / speech, confusion=conf / speech, speech_s=speech)


def _rounded(s: Score) -> dict[str, float]:
    return {k: round(v, 6) for k, v in asdict(s).items()}


def render_table(report: Report) -> str:
    """The report for people: a row per uri and a TOTAL row, rates in percent."""
    name_w = max([5, *(len(u) for u in report.files)])
    head = f"{'file':<{name_w}}  {'DER':>7}  {'miss':>7}  {'FA':>7}  {'conf':>7}  {'JER':>7}  {'speech':>8}"
    rows = [head, "-" * len(head)]
    items = [*report.files.items(), ("TOTAL", report.total)] if len(report.files) > 1 else [
        *report.files.items()]
    for name, s in items:
        rows.append(f"{name:<{name_w}}  {_pct(s.der)}  {_pct(s.miss)}  {_pct(s.false_alarm)}  "
                    f"{_pct(s.confusion)}  {_pct(s.jer)}  {s.speech_s:7.1f}s")
    return "\n".join(rows)


def _pct(x: float) -> str:
    return f"{100 * x:6.1f}%"


def render_json(report: Report) -> str:
    """`Report.to_json` as one line."""
    return json.dumps(report.to_json())


def annotation_from_rttm_lines(lines: list[str], uri: str) -> Annotation:
    """An `Annotation` from RTTM `SPEAKER` lines made by this project (`rttm_lines`)."""
    out = Annotation(uri=uri)
    for i, line in enumerate(lines):
        fields = line.split()
        onset, duration = float(fields[3]), float(fields[4])
        out[Segment(onset, onset + duration), i] = fields[7]
    return out


__all__ = ["Report", "Rttm", "Score", "ScoreError", "annotation_from_rttm_lines", "check_reference",
           "read_rttm", "read_uem", "render_json", "render_table", "score"]
