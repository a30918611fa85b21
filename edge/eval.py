"""`edge eval AUDIO...`: run the live engine (or a running daemon) over recordings and score it.

The engine path is `edge diarize`'s (`diarize_file`: the worker's streaming code fed in pieces),
once per preset; the daemon path streams each file over `/v1/listen` with `edge stream`'s client
and scores the speaker turns that come back. Scoring is `edge.diarization.score` (pyannote).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyannote.core import Annotation

from edge.clock import FRAME_S
from edge.diarization.score import Report, Rttm, ScoreError, annotation_from_rttm_lines, score
from edge.settings import DIARIZATION_PRESETS, Settings

CONFIGURED = "configured"  # the streaming parameters the settings give (hop/window or a preset)
RUNTIMES = ("auto", "onnx", "nemo")  # EDGE_DIARIZATION_RUNTIME's values
PRECISIONS = ("fp32", "int8")  # EDGE_DIARIZATION_PRECISION's values


@dataclass
class Run:
    """One preset (or one daemon) over every file: its score and what it cost."""

    name: str
    report: Report
    hypothesis: dict[str, Annotation]
    audio_s: float
    compute_s: float | None = None  # None through a daemon: its compute is not ours to time
    params: dict[str, int] | None = None
    measured_latency_s: list[float] = field(default_factory=list)  # daemon: per final turn

    @property
    def rtf(self) -> float | None:
        """Compute seconds per audio second."""
        return None if self.compute_s is None else self.compute_s / max(self.audio_s, 1e-9)

    @property
    def latency_s(self) -> float | None:
        """Label latency. Engine: chunk + right context + the mean step time (RTF x chunk), the
        longest a frame waits for its label. Daemon: the median, over final speaker turns, of the
        time from sending the audio of a turn's end to receiving the turn."""
        if self.params is not None and self.rtf is not None:
            chunk_s = self.params["chunk_len"] * FRAME_S
            return chunk_s + self.params["chunk_right_context"] * FRAME_S + self.rtf * chunk_s
        return statistics.median(self.measured_latency_s) if self.measured_latency_s else None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, **self.report.to_json(), "rtf": _round(self.rtf),
                "latency_s": _round(self.latency_s), "audio_s": round(self.audio_s, 3),
                "params": self.params}


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def usage_problem(*, audio: list[Path], hyp: Path | None, preset: str | None, url: str | None,
                  model: Path | None, runtime: str | None, collar: float, speed: float,
                  precision: str | None = None) -> str | None:
    """What is wrong with this combination of `edge eval` options (one line), or None."""
    if bool(hyp) == bool(audio):
        return "give either --hyp RTTM|DIR or AUDIO files (not both, not neither)"
    if hyp and (preset or url or model):
        return "--preset, --url and --model need AUDIO files, not --hyp"
    if url and (preset or model or runtime or precision):
        return ("--url scores the daemon's own settings: --preset, --model, --runtime and "
                "--precision do not apply")
    if runtime is not None and runtime not in RUNTIMES:
        return f"--runtime {runtime!r}: allowed: {', '.join(RUNTIMES)}"
    if precision is not None and precision not in PRECISIONS:
        return f"--precision {precision!r}: allowed: {', '.join(PRECISIONS)}"
    if collar < 0:
        return f"--collar {collar}: must be >= 0 seconds"
    if speed <= 0:
        return f"--speed {speed}: must be > 0"
    missing = [str(p) for p in [*audio, *([model] if model else [])] if not p.is_file()]
    return f"{missing[0]}: file does not exist" if missing else None


def parse_presets(text: str | None) -> list[str]:
    """`--preset very-high,low` -> the names, checked; None -> [CONFIGURED].

    Raises `ScoreError` naming the bad value and what is allowed.
    """
    if not text:
        return [CONFIGURED]
    names = [n.strip() for n in text.split(",") if n.strip()]
    allowed = [*DIARIZATION_PRESETS, CONFIGURED]
    for name in names:
        if name not in allowed:
            raise ScoreError(f"--preset: {name!r} is not a preset (allowed: {', '.join(allowed)})")
    if not names:
        raise ScoreError(f"--preset: no name given (allowed: {', '.join(allowed)})")
    return list(dict.fromkeys(names))


def reference_for(paths: list[Path], reference: Rttm) -> Rttm:
    """The part of `reference` for these audio files (uri = file name without suffix).

    Raises `ScoreError` naming the audio file whose uri the reference lacks.
    """
    turns = {}
    for path in paths:
        if path.stem not in reference.turns:
            raise ScoreError(f"{path}: no reference turns for uri {path.stem!r} in {reference.source} "
                             f"(it has: {', '.join(sorted(reference.turns)) or 'nothing'})")
        turns[path.stem] = reference.turns[path.stem]
    return Rttm(turns, {u: reference.where[u] for u in turns}, reference.source)


def run_engine(
    paths: list[Path],
    reference: Rttm,
    presets: list[str],
    settings: Settings,
    *,
    score_args: dict[str, Any],
    piece_ms: int = 500,
    model_path: Path | None = None,
    progress: Callable[[str, float, float], None] | None = None,
    runtime: str | None = None,
    precision: str | None = None,
) -> list[Run]:
    """Diarize every file with the live engine once per preset and score each preset.

    `score_args` go to `score` (collar, skip_overlap, uem); `progress(label, done_s, total_s)`
    follows each file; `runtime` / `precision` override the settings' (as `edge diarize`).
    Returns a `Run` per preset. Raises `ScoreError`, `ValueError` (unreadable audio) and
    `ModelUnavailable`.
    """
    from edge.diarization.files import diarize_file, read_audio, rttm_lines

    reference = reference_for(paths, reference)
    audio = {path.stem: read_audio(path) for path in paths}
    runs = []
    for name in presets:
        preset = settings if name == CONFIGURED else settings.model_copy(
            update={"edge_diarization_preset": name})
        hypothesis: dict[str, Annotation] = {}
        audio_s = compute_s = 0.0
        params: dict[str, int] = {}
        for uri, samples in audio.items():
            label = f"{name} {uri}"

            def step(done: float, total: float, label: str = label) -> None:
                if progress is not None:
                    progress(label, done, total)

            result = diarize_file(samples, preset, piece_ms, model_path, progress=step,
                                  runtime=runtime, precision=precision)
            hypothesis[uri] = annotation_from_rttm_lines(rttm_lines(result.probs, uri), uri)
            audio_s += result.audio_s
            compute_s += result.compute_s
            params = result.params
        report = score(reference, hypothesis, **score_args)
        runs.append(Run(name, report, hypothesis, audio_s, compute_s, params))
    return runs


async def run_daemon(
    paths: list[Path],
    reference: Rttm,
    url: str,
    *,
    key: str | None,
    speed: float,
    score_args: dict[str, Any],
    on_file: Callable[[Path], None] | None = None,
) -> Run:
    """Stream every file to the daemon at `url` at `speed` x real time, asking for speaker turns,
    and score the final turns that come back (labelled final words when there are none).

    Returns one `Run`. Raises `ScoreError` for unreadable audio, a daemon that refuses or cannot
    be reached, and a stream that does not close normally (1000).
    """
    from websockets.exceptions import InvalidStatus, WebSocketException

    from edge import client

    reference = reference_for(paths, reference)
    hypothesis: dict[str, Annotation] = {}
    audio_s = 0.0
    waits: list[float] = []
    for path in paths:
        if on_file is not None:
            on_file(path)
        try:
            samples, rate = client.read_audio(path)
        except (OSError, RuntimeError) as exc:  # soundfile's errors are RuntimeErrors
            raise ScoreError(f"{path}: cannot read audio: {exc}") from exc
        try:
            result = await client.stream_audio(url, samples, rate, key=key, speed=speed,
                                               query={"diarize": True, "speaker_turns": True})
        except InvalidStatus as exc:
            raise ScoreError(f"{url} refused: HTTP {exc.response.status_code} "
                             f"{exc.response.body.decode(errors='replace')}".rstrip()) from exc
        except (OSError, WebSocketException) as exc:
            raise ScoreError(f"cannot stream to {url}: {type(exc).__name__}: {exc}") from exc
        if result.close_code != 1000:
            errors = [m.get("description") for m in result.messages if m.get("type") == "Error"]
            raise ScoreError(f"{path}: the daemon closed the stream {result.close_code} "
                             f"{result.close_reason} {'; '.join(map(str, errors))}".rstrip())
        uri = path.stem
        hypothesis[uri] = annotation_from_rttm_lines(client.rttm_from_messages(result.messages, uri), uri)
        audio_s += result.sent_audio_s
        for msg, at in zip(result.messages, result.received_at, strict=True):
            if msg.get("type") == "SpeakerTurn" and msg.get("is_final"):
                sent = result.sent_time(max(0.0, msg["end"] - 1e-6))
                if sent is not None:
                    waits.append(at - sent)
    report = score(reference, hypothesis, **score_args)
    return Run(url, report, hypothesis, audio_s, measured_latency_s=waits)


def render_runs(runs: list[Run]) -> str:
    """A row per run (preset or daemon): total DER and parts, JER, RTF, label latency."""
    name_w = max([6, *(len(r.name) for r in runs)])
    head = (f"{'preset':<{name_w}}  {'DER':>7}  {'miss':>7}  {'FA':>7}  {'conf':>7}  {'JER':>7}  "
            f"{'RTF':>6}  {'latency':>8}  {'audio':>7}")
    rows = [head, "-" * len(head)]
    for r in runs:
        t = r.report.total
        rtf = f"{r.rtf:6.3f}" if r.rtf is not None else f"{'-':>6}"
        lat = f"{r.latency_s:7.2f}s" if r.latency_s is not None else f"{'-':>8}"
        rows.append(f"{r.name:<{name_w}}  {_pct(t.der)}  {_pct(t.miss)}  {_pct(t.false_alarm)}  "
                    f"{_pct(t.confusion)}  {_pct(t.jer)}  {rtf}  {lat}  {r.audio_s:6.1f}s")
    return "\n".join(rows)


def _pct(x: float) -> str:
    return f"{100 * x:6.1f}%"


def render_runs_json(runs: list[Run]) -> str:
    """One line: `{"runs": [...]}`, each run the score's keys plus rtf, latency_s, params."""
    return json.dumps({"runs": [r.to_json() for r in runs]})


def write_hypotheses(runs: list[Run], folder: Path) -> None:
    """Each run's hypothesis as RTTM, `folder/<run name>/<uri>.rttm` (a daemon run: `daemon/`)."""
    for r in runs:
        sub = folder / (r.name if r.params is not None else "daemon")
        sub.mkdir(parents=True, exist_ok=True)
        for uri, annotation in r.hypothesis.items():
            with open(sub / f"{uri}.rttm", "w") as f:
                annotation.write_rttm(f)


__all__ = ["CONFIGURED", "PRECISIONS", "RUNTIMES", "Run", "parse_presets", "reference_for", "render_runs",
           "render_runs_json", "run_daemon", "run_engine", "usage_problem", "write_hypotheses"]
