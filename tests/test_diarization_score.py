"""edge.diarization.score: RTTM/UEM reading with errors that name file and line, and scores that
are exactly what pyannote.metrics gives when called directly on the same turns."""

from __future__ import annotations

from pathlib import Path

import pytest
from pyannote.core import Annotation, Segment, Timeline
from pyannote.metrics.diarization import DiarizationErrorRate, JaccardErrorRate

from edge.diarization.score import ScoreError, read_rttm, read_uem, score

pytestmark = pytest.mark.filterwarnings("ignore:.uem. was approximated")

Turns = list[tuple[str, float, float, str]]  # uri, start, end, speaker

REF: Turns = [("a", 0.0, 5.0, "alice"), ("a", 5.0, 10.0, "bob"), ("a", 8.0, 9.5, "carol"),
              ("b", 1.0, 4.0, "bob"), ("b", 6.0, 12.0, "alice")]
# Misses, false alarms, confusion, a split speaker and an extra one: every DER part is non-zero.
HYP: Turns = [("a", 0.3, 6.0, "s1"), ("a", 6.0, 10.4, "s2"), ("a", 11.0, 12.0, "s3"),
              ("b", 1.0, 2.5, "s1"), ("b", 2.5, 4.0, "s2"), ("b", 7.0, 12.0, "s1")]


def rttm(path: Path, turns: Turns) -> Path:
    path.write_text("".join(f"SPEAKER {u} 1 {s:.3f} {e - s:.3f} <NA> <NA> {who} <NA> <NA>\n"
                            for u, s, e, who in turns))
    return path


def annotations(turns: Turns) -> dict[str, Annotation]:
    """The same turns built straight with pyannote.core, bypassing our reader."""
    out: dict[str, Annotation] = {}
    for i, (u, s, e, who) in enumerate(turns):
        out.setdefault(u, Annotation(uri=u))[Segment(s, e), i] = who
    return out


def direct(ref: Turns, hyp: Turns, **kw: object) -> tuple[dict[str, tuple[float, float]], float, float]:
    """pyannote.metrics on its own: per uri (DER, JER), and the totals."""
    der, jer = DiarizationErrorRate(**kw), JaccardErrorRate(**kw)  # type: ignore[arg-type]
    r, h = annotations(ref), annotations(hyp)
    per = {u: (der(r[u], h.get(u, Annotation(uri=u))), jer(r[u], h.get(u, Annotation(uri=u)))) for u in r}
    return per, abs(der), abs(jer)


def scored(tmp_path: Path, ref: Turns, hyp: Turns, **kw: object):  # type: ignore[no-untyped-def]
    reference = read_rttm(rttm(tmp_path / "ref.rttm", ref))
    hypothesis = read_rttm(rttm(tmp_path / "hyp.rttm", hyp), known=reference)
    return score(reference, hypothesis.turns, **kw)  # type: ignore[arg-type]


def test_perfect_hypothesis_scores_zero(tmp_path: Path) -> None:
    report = scored(tmp_path, REF, REF)
    assert report.total.der == 0 and report.total.jer == 0
    assert report.total.speech_s == pytest.approx(5 + 5 + 1.5 + 3 + 6)


def test_label_permutation_scores_zero(tmp_path: Path) -> None:
    renamed = {"alice": "x", "bob": "y", "carol": "z"}
    report = scored(tmp_path, REF, [(u, s, e, renamed[w]) for u, s, e, w in REF])
    assert report.total.der == 0 and report.total.jer == 0


def test_a_shift_inside_the_collar_scores_zero_with_that_collar(tmp_path: Path) -> None:
    ref: Turns = [("m", 0.0, 5.0, "A"), ("m", 5.0, 10.0, "B")]
    shifted: Turns = [("m", 0.2, 5.2, "A"), ("m", 5.2, 10.2, "B")]
    # pyannote's collar is the whole width: 0.5 leaves 0.25 s out on each side of a boundary.
    assert scored(tmp_path, ref, shifted, collar=0.5).total.der == 0
    without = scored(tmp_path, ref, shifted)
    assert without.total.der > 0
    assert without.total.der == pytest.approx(direct(ref, shifted)[1], abs=1e-12)


@pytest.mark.parametrize("kw", [{}, {"collar": 0.5}, {"skip_overlap": True}])
def test_a_nontrivial_pair_scores_what_pyannote_gives(tmp_path: Path, kw: dict[str, object]) -> None:
    report = scored(tmp_path, REF, HYP, **kw)
    per, der, jer = direct(REF, HYP, **kw)
    assert report.total.der == pytest.approx(der, abs=1e-12)
    assert report.total.jer == pytest.approx(jer, abs=1e-12)
    for uri, (d, j) in per.items():
        assert report.files[uri].der == pytest.approx(d, abs=1e-12)
        assert report.files[uri].jer == pytest.approx(j, abs=1e-12)
    t = report.total
    assert min(t.miss, t.false_alarm, t.confusion) > 0
    assert t.der == pytest.approx(t.miss + t.false_alarm + t.confusion)


def test_uem_limits_the_scored_region_as_pyannote_does(tmp_path: Path) -> None:
    reference = read_rttm(rttm(tmp_path / "ref.rttm", REF))
    (tmp_path / "x.uem").write_text("a 1 0.0 7.5\nb 1 2.0 12.0\nother 1 0 9\n")
    uem = read_uem(tmp_path / "x.uem", reference)
    report = score(reference, annotations(HYP), uem=uem)
    metric = DiarizationErrorRate()
    r, h = annotations(REF), annotations(HYP)
    for uri, (a, b) in {"a": (0.0, 7.5), "b": (2.0, 12.0)}.items():
        assert report.files[uri].der == pytest.approx(metric(r[uri], h[uri], uem=Timeline([Segment(a, b)])))
    assert report.total.der == pytest.approx(abs(metric))


def test_a_reference_file_without_hypothesis_is_all_missed(tmp_path: Path) -> None:
    report = scored(tmp_path, REF, [t for t in REF if t[0] == "a"])
    assert report.files["a"].der == 0
    assert report.files["b"].miss == 1.0 and report.files["b"].der == 1.0


def test_directories_are_matched_by_name(tmp_path: Path) -> None:
    (tmp_path / "ref").mkdir()
    (tmp_path / "hyp").mkdir()
    for uri in ("a", "b"):
        rttm(tmp_path / "ref" / f"{uri}.rttm", [t for t in REF if t[0] == uri])
        rttm(tmp_path / "hyp" / f"{uri}.rttm", [t for t in HYP if t[0] == uri])
    (tmp_path / "hyp" / "notes.txt").write_text("not an rttm")
    reference = read_rttm(tmp_path / "ref")
    report = score(reference, read_rttm(tmp_path / "hyp", known=reference).turns)
    assert list(report.files) == ["a", "b"]
    assert report.total.der == pytest.approx(direct(REF, HYP)[1])


@pytest.mark.parametrize(("line", "says"), [
    ("SPEAKER a 1 abc 1.0 <NA> <NA> alice <NA> <NA>", "onset 'abc' is not a number of seconds >= 0"),
    ("SPEAKER a 1 1.0 -2 <NA> <NA> alice <NA> <NA>", "duration '-2' is not a number of seconds >= 0"),
    ("SPEAKER a 1 1.0 nan <NA> <NA> alice <NA> <NA>", "duration 'nan' is not a number"),
    ("SPEAKER a 1 1.0 2.0", "needs at least 8 fields"),
    ("a 1 1.0 2.0 alice", "not an RTTM line"),
])
def test_a_malformed_line_is_named_by_file_and_line(tmp_path: Path, line: str, says: str) -> None:
    path = tmp_path / "bad.rttm"
    path.write_text("# a comment\nSPEAKER a 1 0.0 1.0 <NA> <NA> bob <NA> <NA>\n\n" + line + "\n")
    with pytest.raises(ScoreError) as err:
        read_rttm(path)
    assert str(err.value).startswith(f"{path}:4: ") and says in str(err.value)


def test_other_nist_records_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "nist.rttm"
    path.write_text("SPKR-INFO a 1 <NA> <NA> <NA> unknown alice <NA>\n"
                    "SPEAKER a 1 0.0 1.0 <NA> <NA> alice <NA> <NA>\n")
    assert read_rttm(path).turns["a"].get_timeline().duration() == 1.0


def test_an_unknown_uri_in_the_hypothesis_is_named(tmp_path: Path) -> None:
    reference = read_rttm(rttm(tmp_path / "ref.rttm", REF))
    path = rttm(tmp_path / "hyp.rttm", [*HYP[:2], ("c", 0.0, 1.0, "s1")])
    with pytest.raises(ScoreError) as err:
        read_rttm(path, known=reference)
    assert str(err.value) == (f"{path}:3: uri 'c' is not in the reference {tmp_path / 'ref.rttm'} "
                              f"(it has: a, b)")


def test_an_empty_reference_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ref.rttm"
    path.write_text("# nothing here\n")
    with pytest.raises(ScoreError, match=f"^{path}: the reference has no SPEAKER turns"):
        score(read_rttm(path), {})


def test_a_uri_in_two_files_is_refused(tmp_path: Path) -> None:
    rttm(tmp_path / "one.rttm", REF[:1])
    rttm(tmp_path / "two.rttm", REF[1:2])
    with pytest.raises(ScoreError, match=f"^{tmp_path / 'two.rttm'}:1: uri 'a' is also in .*one.rttm:1$"):
        read_rttm(tmp_path)


def test_uem_errors_name_file_and_line(tmp_path: Path) -> None:
    reference = read_rttm(rttm(tmp_path / "ref.rttm", REF))
    uem = tmp_path / "x.uem"
    uem.write_text("a 1 0 10\nb 1 5 2\n")
    with pytest.raises(ScoreError, match=f"^{uem}:2: end 2 is not after start 5$"):
        read_uem(uem, reference)
    uem.write_text("a 1 0 10\n")
    with pytest.raises(ScoreError, match=f"^{uem}: no region for reference uri 'b'"):
        read_uem(uem, reference)
