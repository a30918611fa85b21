"""The diarization tools on the command line: `edge model fetch | export`, `edge diarize FILE`
and `edge eval`. Like `edge.cli`, they parse arguments, call the library and print; the
model's download and unpacking show a progress bar (`ProgressBar`).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from edge.cli import client_args, client_target
from edge.settings import Settings

if TYPE_CHECKING:
    from pyannote.core import Annotation

    from edge.diarization.score import Rttm


def add_model(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model", help="manage the diarization model")
    msub = p.add_subparsers(dest="model_command", required=True)
    f = msub.add_parser("fetch", help="resolve/download the model, unpack it once into the cache, load it")
    f.add_argument("--no-load", action="store_true", help="stop after download and unpacking (no NeMo)")
    f.set_defaults(run=_model_fetch)
    e = msub.add_parser("export", help="export the model's streaming step to ONNX (loads it with NeMo once)")
    e.add_argument("--model", type=Path, metavar="PATH", help="a .nemo instead of the configured model")
    e.add_argument("--quantize", choices=["int8"], help="also write model.int8.onnx")
    e.add_argument("--out", type=Path, metavar="DIR",
                   help="export folder (default NEMO_CACHE_DIR/exported/<name>-<sha256[:12]>/)")
    e.set_defaults(run=_model_export)


def _model_fetch(settings: Settings, args: argparse.Namespace) -> int:
    import time

    from edge.diarization.model import ModelUnavailable, extract_model, resolve_model

    bar = ProgressBar("download", unit="MB", scale=1e6)
    try:
        path = resolve_model(settings, progress=bar)
        bar.close()
        folder = extract_model(path, settings)
        print(f"model: {path} (unpacked in {folder})", file=sys.stderr)
        if args.no_load:
            return 0
        from edge.diarization.model import rss_bytes
        from edge.diarization.worker.loading import load_model, select_device

        device = select_device(settings)
        start = time.perf_counter()
        load_model(path, settings, device)
        took = time.perf_counter() - start
    except ModelUnavailable as exc:
        bar.close()
        print(f"edge: model unavailable: {exc}", file=sys.stderr)
        return 1
    print(f"model: ready on {device} in {took:.1f} s, RSS {rss_bytes() / 2**30:.2f} GiB", file=sys.stderr)
    return 0


def _model_export(settings: Settings, args: argparse.Namespace) -> int:
    from edge.diarization.model import ModelUnavailable, resolve_model

    if args.model is not None and not args.model.is_file():
        print(f"edge: --model {args.model}: file does not exist", file=sys.stderr)
        return 2
    try:
        from edge.diarization.worker.export import ExportError, export_model
    except ImportError as exc:
        print(f"edge: export needs torch, NeMo and onnx (pip install 'edge[diarization]'): {exc}",
              file=sys.stderr)
        return 1
    bar = ProgressBar("download", unit="MB", scale=1e6)
    try:
        path = args.model or resolve_model(settings, progress=bar)
        bar.close()
        result = export_model(settings, path, out_dir=args.out, quantize=args.quantize)
    except ModelUnavailable as exc:
        bar.close()
        print(f"edge: model unavailable: {exc}", file=sys.stderr)
        return 1
    except ExportError as exc:
        print(f"edge: export failed: {exc}", file=sys.stderr)
        return 1
    sizes = ", ".join(f"{name} {size / 1e6:.1f} MB" for name, size in sorted(result.files.items()))
    print(f"{result.status}: {result.folder} ({sizes})")
    return 0


def add_diarize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("diarize", help="run the live diarizer over an audio file, fed in pieces")
    p.add_argument("file", type=Path, help="audio file (any rate/channels soundfile reads)")
    p.add_argument("--piece-ms", type=int, default=500, help="piece size fed to the engine (default 500)")
    p.add_argument("--rttm", type=Path, metavar="OUT", help="write speaker turns as RTTM")
    p.add_argument("--probs", type=Path, metavar="OUT.npy",
                   help="write frame probabilities (frames x 4) and OUT.json with the streaming parameters")
    p.add_argument("--model", type=Path, metavar="PATH", help="a .nemo instead of the configured model")
    p.add_argument("--runtime", choices=("onnx", "nemo"),
                   help="the ONNX export or NeMo (default: EDGE_DIARIZATION_RUNTIME, auto)")
    p.add_argument("--precision", choices=("fp32", "int8"),
                   help="the ONNX export's precision (default: EDGE_DIARIZATION_PRECISION, fp32)")
    p.set_defaults(run=_diarize)


def _diarize(settings: Settings, args: argparse.Namespace) -> int:
    from edge.diarization.files import diarize_file, read_audio, write_probs, write_rttm
    from edge.diarization.model import ModelUnavailable

    if args.model is not None and not args.model.is_file():
        print(f"edge: --model {args.model}: file does not exist", file=sys.stderr)
        return 2
    bar = ProgressBar("diarize", unit="s", scale=1.0)
    try:
        audio = read_audio(args.file)
        result = diarize_file(audio, settings, args.piece_ms, args.model, progress=bar,
                              runtime=args.runtime, precision=args.precision)
    except (ModelUnavailable, ValueError) as exc:
        bar.close()
        print(f"edge: {exc}", file=sys.stderr)
        return 1
    bar.close()
    runtime = result.runtime + (f" {result.precision}" if result.precision else "")
    print(f"diarized {result.audio_s:.1f} s in {result.compute_s:.1f} s with {runtime} on {result.device} "
          f"(RTF {result.compute_s / max(result.audio_s, 1e-9):.3f}), {len(result.probs)} frames",
          file=sys.stderr)
    if args.rttm:
        write_rttm(result.probs, args.rttm, args.file.stem)
    if args.probs:
        write_probs(result, args.probs)
    if not args.rttm and not args.probs:
        from edge.diarization.files import rttm_lines

        print("\n".join(rttm_lines(result.probs, args.file.stem)))
    return 0


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="score diarization: RTTM against RTTM, or the live engine / a daemon over audio",
        description="edge eval --ref REF --hyp HYP scores two RTTMs; edge eval AUDIO... --ref REF "
                    "runs the live engine over the audio once per preset (or streams it to a "
                    "daemon with --url) and scores that. REF/HYP: an RTTM file or a directory of them.")
    p.add_argument("audio", nargs="*", type=Path, metavar="AUDIO", help="recordings (uri = file name)")
    p.add_argument("--ref", type=Path, required=True, metavar="RTTM|DIR", help="reference turns")
    p.add_argument("--hyp", type=Path, metavar="RTTM|DIR", help="hypothesis turns (instead of AUDIO)")
    p.add_argument("--collar", type=float, default=0.0, metavar="S",
                   help="seconds left out around each reference boundary, half before and half after, "
                        "as pyannote.metrics counts it (md-eval's 0.25 s per side is 0.5; default 0)")
    p.add_argument("--skip-overlap", action="store_true", help="leave overlapped speech out of the score")
    p.add_argument("--uem", type=Path, metavar="FILE", help="scored regions (uri channel start end)")
    p.add_argument("--json", action="store_true", help="end with one JSON object on the last line")
    p.add_argument("--plot", type=Path, metavar="OUT.png", help="draw reference, hypothesis and errors")
    p.add_argument("--preset", metavar="P,...", help="engine presets to compare: very-high, high, low, "
                   "ultra-low, configured (default: configured, i.e. the settings' parameters)")
    p.add_argument("--runtime", metavar="NAME", help="engine runtime: auto, onnx or nemo "
                   "(default: EDGE_DIARIZATION_RUNTIME)")
    p.add_argument("--precision", metavar="NAME", help="onnx precision: fp32 or int8 "
                   "(default: EDGE_DIARIZATION_PRECISION)")
    p.add_argument("--model", type=Path, metavar="PATH", help="a .nemo instead of the configured model")
    p.add_argument("--piece-ms", type=int, default=500, help="piece size fed to the engine (default 500)")
    p.add_argument("--save-hyp", type=Path, metavar="DIR", help="write each run's RTTM to DIR/<preset>/")
    client_args(p)
    p.add_argument("--speed", type=float, default=1.0, help="with --url: pace at N x real time (default 1)")
    p.set_defaults(run=_eval)


def _eval(settings: Settings, args: argparse.Namespace) -> int:
    try:
        from edge.diarization.score import ScoreError
        from edge.eval import usage_problem

        if args.plot:
            import matplotlib  # noqa: F401  (checked now, not after minutes of diarizing)
    except ImportError as exc:  # pyannote.metrics / matplotlib: the `eval` extra
        print(f"edge eval needs the eval extra (pip install 'edge[eval]'): {exc}", file=sys.stderr)
        return 1
    from edge.diarization.model import ModelUnavailable

    usage = usage_problem(audio=args.audio, hyp=args.hyp, preset=args.preset, url=args.url,
                          model=args.model, runtime=args.runtime, precision=args.precision,
                          collar=args.collar, speed=args.speed)
    if usage:
        print(f"edge eval: {usage}", file=sys.stderr)
        return 2
    try:
        return _eval_run(settings, args)
    except (ScoreError, ModelUnavailable, ValueError) as exc:
        print(f"edge: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # an output (--plot, --save-hyp) that cannot be written
        print(f"edge: {exc}", file=sys.stderr)
        return 1


def _eval_run(settings: Settings, args: argparse.Namespace) -> int:
    from edge import eval as ev
    from edge.diarization.plot import plot_timelines
    from edge.diarization.score import check_reference, read_rttm, read_uem, render_json, render_table, score

    reference = read_rttm(args.ref)
    check_reference(reference)
    uem = read_uem(args.uem, reference) if args.uem else None
    score_args = {"collar": args.collar, "skip_overlap": args.skip_overlap, "uem": uem}

    def plot(ref: Rttm, hypotheses: list[tuple[str, dict[str, Annotation]]]) -> None:
        plot_timelines(ref, hypotheses, args.plot, collar=args.collar, skip_overlap=args.skip_overlap,
                       uem=uem)
        print(f"plot: {args.plot}", file=sys.stderr)

    if args.hyp:
        hypothesis = read_rttm(args.hyp, known=reference)
        report = score(reference, hypothesis.turns, **score_args)
        print(render_table(report))
        if args.plot:
            plot(reference, [("hyp", hypothesis.turns)])
        if args.json:
            print(render_json(report))
        return 0
    if args.url:
        url, key = client_target(settings, args)
        runs = [asyncio.run(ev.run_daemon(
            args.audio, reference, url, key=key, speed=args.speed, score_args=score_args,
            on_file=lambda path: print(f"streaming {path} to {url} at {args.speed:g}x", file=sys.stderr)))]
    else:
        presets = ev.parse_presets(args.preset)
        bars: dict[str, ProgressBar] = {}

        def progress(label: str, done: float, total: float) -> None:
            if label not in bars:
                for bar in bars.values():
                    bar.close()
                bars[label] = ProgressBar(label, unit="s", scale=1.0)
            bars[label](done, total)

        runs = ev.run_engine(args.audio, reference, presets, settings, score_args=score_args,
                             piece_ms=args.piece_ms, model_path=args.model, progress=progress,
                             runtime=args.runtime, precision=args.precision)
        for bar in bars.values():
            bar.close()
    for run in runs:
        print(f"\n{run.name}:")
        print(render_table(run.report))
    print()
    print(ev.render_runs(runs))
    if args.save_hyp:
        ev.write_hypotheses(runs, args.save_hyp)
    if args.plot:
        plot(ev.reference_for(args.audio, reference), [(r.name, r.hypothesis) for r in runs])
    if args.json:
        print(ev.render_runs_json(runs))
    return 0


class ProgressBar:
    """A one-line progress bar on stderr (a line per 10% when stderr is not a terminal)."""

    def __init__(self, label: str, unit: str, scale: float) -> None:
        self.label, self.unit, self.scale = label, unit, scale
        self.tty = sys.stderr.isatty()
        self.shown = -1
        self.open = False

    def __call__(self, done: float, total: float) -> None:
        pct = int(100 * done / total) if total else 0
        if pct == self.shown or (not self.tty and pct < 100 and pct // 10 == self.shown // 10):
            return
        self.shown = pct
        filled = pct * 30 // 100
        line = (f"{self.label} [{'#' * filled}{'.' * (30 - filled)}] {pct:3d}% "
                f"{done / self.scale:.1f}/{total / self.scale:.1f} {self.unit}")
        if self.tty:
            print("\r" + line, end="", file=sys.stderr, flush=True)
            self.open = True
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.open:
            print(file=sys.stderr, flush=True)
            self.open = False


__all__ = ["ProgressBar", "add_diarize", "add_eval", "add_model"]
