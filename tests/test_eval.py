"""`edge eval`: the command as operators run it. RTTM against RTTM (table, --json, --plot, errors
without tracebacks), a meeting from scripts/make_meeting.py through the live engine with the
tiny random-weight model, and through a running daemon (--url).

Random weights prove plumbing, not accuracy: these tests check that the numbers are the scorer's
and that the parts fit together, never that the DER is low.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile
from pyannote.core import Annotation, Segment
from pyannote.metrics.diarization import DiarizationErrorRate, JaccardErrorRate

from edge.cli import main
from tests.helpers.daemon import KEY, ROOT

pytestmark = pytest.mark.filterwarnings("ignore:.uem. was approximated")

REF = ("SPEAKER m 1 0.0 5.0 <NA> <NA> A <NA> <NA>\n"
       "SPEAKER m 1 5.0 5.0 <NA> <NA> B <NA> <NA>\n"
       "SPEAKER n 1 1.0 4.0 <NA> <NA> A <NA> <NA>\n")
HYP = ("SPEAKER m 1 0.5 6.0 <NA> <NA> x <NA> <NA>\n"
       "SPEAKER m 1 6.5 4.5 <NA> <NA> y <NA> <NA>\n"
       "SPEAKER n 1 0.0 3.0 <NA> <NA> y <NA> <NA>\n")


def edge(*args: str) -> subprocess.CompletedProcess[str]:
    """`python -m edge ...` as a user runs it (the conftest fixture already cleaned the env)."""
    return subprocess.run([sys.executable, "-m", "edge", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def make_meeting(out: Path, seconds: float, seed: int) -> Path:
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_meeting.py"), "--out", str(out),
                          "--seconds", str(seconds), "--seed", str(seed)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return out / "meeting.wav"


def test_rttm_pair_prints_a_table_and_json_equal_to_pyannote(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "ref.rttm").write_text(REF)
    (tmp_path / "hyp.rttm").write_text(HYP)
    rc = main(["eval", "--ref", str(tmp_path / "ref.rttm"), "--hyp", str(tmp_path / "hyp.rttm"), "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    assert [line.split()[0] for line in out[2:5]] == ["m", "n", "TOTAL"]
    got = json.loads(out[-1])
    assert set(got) == {"der", "jer", "miss", "false_alarm", "confusion", "speech_s", "files"}
    der, jer = DiarizationErrorRate(), JaccardErrorRate()
    for uri, turns in {"m": ([(0, 5, "A"), (5, 10, "B")], [(0.5, 6.5, "x"), (6.5, 11, "y")]),
                       "n": ([(1, 5, "A")], [(0, 3, "y")])}.items():
        r, h = Annotation(uri=uri), Annotation(uri=uri)
        for s, e, who in turns[0]:
            r[Segment(s, e)] = who
        for s, e, who in turns[1]:
            h[Segment(s, e)] = who
        parts = der(r, h, detailed=True)
        assert got["files"][uri]["der"] == pytest.approx(parts["diarization error rate"], abs=1e-6)
        miss = parts["missed detection"] / parts["total"]
        assert got["files"][uri]["miss"] == pytest.approx(miss, abs=1e-6)
        assert got["files"][uri]["jer"] == pytest.approx(jer(r, h), abs=1e-6)
    assert got["der"] == pytest.approx(abs(der), abs=1e-6) and got["jer"] == pytest.approx(abs(jer), abs=1e-6)
    assert got["speech_s"] == 14.0
    # The table shows the same total, in percent.
    assert out[4].split()[1] == f"{100 * abs(der):.1f}%"


@pytest.mark.parametrize(("ref", "hyp", "says"), [
    (REF, HYP.replace("0.5 6.0", "0.5 six"), "hyp.rttm:1: duration 'six' is not a number of seconds >= 0"),
    (REF, HYP + "SPEAKER zz 1 0 1 <NA> <NA> x <NA> <NA>\n", "hyp.rttm:4: uri 'zz' is not in the reference"),
    ("", HYP, "ref.rttm: the reference has no SPEAKER turns longer than 0 s"),
    (REF.replace("SPEAKER n 1", "SPEAKR n 1"), HYP, "ref.rttm:3: not an RTTM line"),
])
def test_bad_input_is_one_line_naming_file_and_line(tmp_path: Path, ref: str, hyp: str, says: str) -> None:
    (tmp_path / "ref.rttm").write_text(ref)
    (tmp_path / "hyp.rttm").write_text(hyp)
    run = edge("eval", "--ref", str(tmp_path / "ref.rttm"), "--hyp", str(tmp_path / "hyp.rttm"))
    assert run.returncode == 1
    assert run.stderr.startswith(f"edge: {tmp_path}/") and says in run.stderr, run.stderr
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert run.stdout == ""


@pytest.mark.parametrize(("args", "says"), [
    (["--hyp", "h.rttm", "a.wav"], "give either --hyp RTTM|DIR or AUDIO files"),
    ([], "give either --hyp RTTM|DIR or AUDIO files"),
    (["a.wav", "--runtime", "tpu"], "--runtime 'tpu': allowed: auto, onnx, nemo"),
    (["a.wav", "--precision", "fp16"], "--precision 'fp16': allowed: fp32, int8"),
    (["a.wav", "--url", "ws://127.0.0.1:1", "--runtime", "onnx"], "--runtime and --precision do not apply"),
    (["--hyp", "h.rttm", "--preset", "low"], "--preset, --url and --model need AUDIO files"),
    (["--hyp", "h.rttm", "--collar", "-1"], "--collar -1.0: must be >= 0 seconds"),
    (["missing.wav"], "missing.wav: file does not exist"),
])
def test_usage_errors_exit_2(tmp_path: Path, args: list[str], says: str,
                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--ref", "r.rttm", *args]) == 2
    assert says in capsys.readouterr().err


def test_an_unknown_preset_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    wav = tmp_path / "m.wav"
    wav.write_bytes(b"")
    (tmp_path / "ref.rttm").write_text(REF)
    assert main(["eval", str(wav), "--ref", str(tmp_path / "ref.rttm"), "--preset", "low,fast"]) == 1
    assert capsys.readouterr().err.strip() == (
        "edge: --preset: 'fast' is not a preset (allowed: very-high, high, low, ultra-low, configured)")


def test_plot_marks_pyannotes_error_regions(tmp_path: Path) -> None:
    from edge.diarization.plot import error_regions

    r, h = Annotation(uri="m"), Annotation(uri="m")
    r[Segment(0, 5)] = "A"
    r[Segment(5, 10)] = "B"
    h[Segment(1, 6)] = "x"  # A from 1 to 5 (missed 0-1), then 5-6 is B's: confusion
    h[Segment(6, 10)] = "y"
    h[Segment(11, 12)] = "y"  # nobody there: false alarm
    mapping, spans = error_regions(r, h)
    assert mapping == {"x": "A", "y": "B"}
    assert spans == {"missed detection": [(0, 1)], "false alarm": [(11, 12)], "confusion": [(5, 6)]}

    (tmp_path / "ref.rttm").write_text(REF)
    (tmp_path / "hyp.rttm").write_text(HYP)
    out = tmp_path / "timeline.png"
    assert main(["eval", "--ref", str(tmp_path / "ref.rttm"), "--hyp", str(tmp_path / "hyp.rttm"),
                 "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_make_meeting_is_deterministic_with_turns_pauses_and_overlap(tmp_path: Path) -> None:
    wav = make_meeting(tmp_path / "a", 30, seed=3)
    make_meeting(tmp_path / "b", 30, seed=3)
    make_meeting(tmp_path / "c", 30, seed=4)
    for name in ("meeting.wav", "meeting.rttm", "meeting.words.tsv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "meeting.wav").read_bytes() != (tmp_path / "c" / "meeting.wav").read_bytes()
    info = soundfile.info(str(wav))
    assert (info.samplerate, info.channels) == (16000, 1) and info.duration >= 30
    turns = [line.split() for line in (tmp_path / "a" / "meeting.rttm").read_text().splitlines()]
    spans = [(float(t[3]), float(t[3]) + float(t[4]), t[7]) for t in turns]
    assert len({who for _s, _e, who in spans}) == 3
    gaps = [b[0] - a[1] for a, b in itertools.pairwise(spans)]
    assert any(g > 0.2 for g in gaps) and any(g < 0 for g in gaps)  # pauses and overlap
    words = [line.split("\t") for line in (tmp_path / "a" / "meeting.words.tsv").read_text().splitlines()[1:]]
    for start, end, who, _word in words:  # every word lies inside a turn of its speaker
        assert any(s - 1e-3 <= float(start) < float(end) <= e + 1e-3 and w == who for s, e, w in spans)


@pytest.mark.nemo
@pytest.mark.slow
def test_audio_through_the_engine_prints_a_row_per_preset(tmp_path: Path) -> None:
    from tests.fakes.sortformer import tiny_model_path

    wav = make_meeting(tmp_path, 12, seed=5)
    ref = tmp_path / "meeting.rttm"
    env_file = tmp_path / "eval.env"  # a short chunk and window keep the tiny model quick here
    env_file.write_text(f"NEMO_CACHE_DIR={tmp_path / 'cache'}\nSTT_NEMO_DIARIZATION_HOP_S=0.48\n"
                        "STT_NEMO_DIARIZATION_WINDOW_S=3.2\n")
    run = subprocess.run(
        [sys.executable, "-m", "edge", "eval", str(wav), "--ref", str(ref), "--model", str(tiny_model_path()),
         "--preset", "configured,high", "--json", "--save-hyp", str(tmp_path / "hyp"),
         "--plot", str(tmp_path / "t.png")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**_env(), "EDGE_ENV_FILE": str(env_file)})
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("preset "))
    assert [row.split()[0] for row in lines[header + 2:header + 4]] == ["configured", "high"]
    got = json.loads(lines[-1])["runs"]
    assert [r["name"] for r in got] == ["configured", "high"]
    assert got[0]["params"]["chunk_len"] == 6 and got[1]["params"]["chunk_len"] == 124
    for r in got:
        assert r["audio_s"] == pytest.approx(soundfile.info(str(wav)).duration, abs=1e-3) and r["rtf"] > 0
        chunk = r["params"]["chunk_len"] * 0.08
        assert r["latency_s"] == pytest.approx(chunk + r["params"]["chunk_right_context"] * 0.08
                                               + r["rtf"] * chunk, abs=1e-3)
        assert r["der"] == pytest.approx(r["miss"] + r["false_alarm"] + r["confusion"], abs=1e-5)
        # The saved hypothesis scored as a plain RTTM pair gives the same numbers.
        again = edge("eval", "--ref", str(ref), "--hyp", str(tmp_path / "hyp" / r["name"]), "--json")
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout.strip().splitlines()[-1])["der"] == pytest.approx(r["der"], abs=1e-5)
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.nemo
@pytest.mark.slow
async def test_url_scores_what_a_running_daemon_sends_back(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from tests.fakes.sortformer import tiny_model_path
    from tests.helpers.daemon import running_app

    wav = make_meeting(tmp_path, 12, seed=6)
    cache = tmp_path / "cache"
    async with running_app(stt_enable_nemo_diarization_fallback=True, nemo_cache_dir=cache,
                           edge_model_download=False, edge_diarization_max_rtf=0,
                           nemo_diar_model_path=tiny_model_path()) as app:
        for _ in range(1200):
            if app.status.diarizer["state"] == "ready":
                break
            await asyncio.sleep(0.1)
        assert app.status.diarizer["state"] == "ready", app.status.snapshot()
        url = f"ws://127.0.0.1:{app.server.port}"
        rc = await asyncio.to_thread(main, ["eval", str(wav), "--ref", str(tmp_path / "meeting.rttm"),
                                            "--url", url, "--key", KEY, "--speed", "4", "--json",
                                            "--save-hyp", str(tmp_path / "hyp")])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    run = json.loads(out[-1])["runs"][0]
    assert run["name"] == url and run["params"] is None and run["rtf"] is None
    assert 0 < run["latency_s"] < 10  # measured: audio sent -> final speaker turn received
    assert run["audio_s"] == pytest.approx(soundfile.info(str(wav)).duration, abs=0.01)
    hyp = (tmp_path / "hyp" / "daemon" / "meeting.rttm").read_text().splitlines()
    assert hyp and all(line.startswith("SPEAKER meeting 1 ") for line in hyp)


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith(("EDGE_", "NEMO_", "HF_", "STT_"))}


def test_an_unreachable_daemon_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np

    soundfile.write(tmp_path / "m.wav", np.zeros(16000, dtype=np.float32), 16000)
    (tmp_path / "ref.rttm").write_text(REF)
    assert main(["eval", str(tmp_path / "m.wav"), "--ref", str(tmp_path / "ref.rttm"),
                 "--url", "ws://127.0.0.1:9"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("edge: cannot stream to ws://127.0.0.1:9: ConnectionRefusedError")
