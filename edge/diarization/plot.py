"""`edge eval --plot OUT.png`: each file's timeline, reference against hypothesis, errors marked.

A panel per file (uri): a lane per reference speaker, then for each hypothesis (a preset, or a
daemon) a lane per hypothesis speaker, renamed to the reference speaker pyannote maps it to, and
an error lane where missed speech, false alarm and speaker confusion are drawn in their own
colours. The error regions are pyannote.metrics' (`IdentificationErrorAnalysis` after the
optimal mapping), so the picture shows exactly what the DER counts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pyannote.core import Annotation, Timeline

from edge.diarization.score import Rttm

ERROR_COLOURS = {"missed detection": "#d62728", "false alarm": "#ff7f0e", "confusion": "#9467bd"}
ERROR_NAMES = {"missed detection": "missed", "false alarm": "false alarm", "confusion": "confusion"}
UNMAPPED = "#7f7f7f"
# Speaker colours: none of them is an error colour, so a speaker bar never reads as an error.
SPEAKER_COLOURS = ["#1f77b4", "#2ca02c", "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#393b79",
                   "#637939"]


def error_regions(
    reference: Annotation,
    hypothesis: Annotation,
    *,
    collar: float = 0.0,
    skip_overlap: bool = False,
    uem: Timeline | None = None,
) -> tuple[dict[str, str], dict[str, list[tuple[float, float]]]]:
    """pyannote's optimal mapping (hypothesis label -> reference label) and, per error kind
    (`missed detection`, `false alarm`, `confusion`), the (start, end) spans it covers."""
    import warnings

    from pyannote.metrics.diarization import DiarizationErrorRate
    from pyannote.metrics.errors.identification import IdentificationErrorAnalysis

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="'uem' was approximated")
        mapping = DiarizationErrorRate().optimal_mapping(reference, hypothesis)
        mapped = hypothesis.rename_labels(mapping=mapping)
        diff = IdentificationErrorAnalysis(collar=collar, skip_overlap=skip_overlap).difference(
            reference, mapped, uem=uem)
    spans: dict[str, list[tuple[float, float]]] = {kind: [] for kind in ERROR_COLOURS}
    for segment, _track, label in diff.itertracks(yield_label=True):
        if label[0] in spans:
            spans[label[0]].append((segment.start, segment.end))
    return {str(k): str(v) for k, v in mapping.items()}, spans


def plot_timelines(
    reference: Rttm,
    hypotheses: list[tuple[str, dict[str, Annotation]]],
    out: Path,
    *,
    collar: float = 0.0,
    skip_overlap: bool = False,
    uem: dict[str, Timeline] | None = None,
) -> None:
    """Draw every reference uri against each named hypothesis into `out` (PNG, or any format
    matplotlib writes by suffix). Raises `OSError` when `out` cannot be written."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a device, and no GUI toolkit wanted
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    uris = list(reference.turns)
    lanes_per_file = [_lanes(reference.turns[u], [(n, h.get(u, Annotation(uri=u))) for n, h in hypotheses],
                             collar, skip_overlap, uem.get(u) if uem else None) for u in uris]
    heights = [max(2, len(lanes)) * 0.32 + 0.8 for lanes in lanes_per_file]
    fig, axes = plt.subplots(len(uris), 1, figsize=(14, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    ref_labels = sorted({str(lbl) for a in reference.turns.values() for lbl in a.labels()})
    colour = {label: SPEAKER_COLOURS[i % len(SPEAKER_COLOURS)] for i, label in enumerate(ref_labels)}
    for ax, uri, lanes in zip(axes[:, 0], uris, lanes_per_file, strict=True):
        names = []
        for row, (name, bars) in enumerate(lanes):
            names.append(name)
            for start, end, key in bars:
                fill = ERROR_COLOURS.get(key) or colour.get(key, UNMAPPED)
                ax.broken_barh([(start, end - start)], (row - 0.4, 0.8), facecolors=fill)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.set_ylim(len(names) - 0.5, -0.5)
        ax.set_title(uri, loc="left", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel("time (s)")
    legend = [Patch(color=c, label=ERROR_NAMES[k]) for k, c in ERROR_COLOURS.items()]
    legend += [Patch(color=UNMAPPED, label="unmapped hypothesis speaker")]
    fig.legend(handles=legend, loc="upper right", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _lanes(
    reference: Annotation,
    hypotheses: list[tuple[str, Annotation]],
    collar: float,
    skip_overlap: bool,
    uem: Timeline | None,
) -> list[tuple[str, list[tuple[float, float, Any]]]]:
    """(lane name, [(start, end, colour key)]) from top to bottom for one file."""
    lanes: list[tuple[str, list[tuple[float, float, Any]]]] = []
    for label in sorted(reference.labels(), key=str):
        spans = reference.label_timeline(label)
        lanes.append((f"ref {label}", [(s.start, s.end, str(label)) for s in spans]))
    for name, hyp in hypotheses:
        mapping, spans = error_regions(reference, hyp, collar=collar, skip_overlap=skip_overlap, uem=uem)
        prefix = f"{name} " if len(hypotheses) > 1 else "hyp "
        for label in sorted(hyp.labels(), key=str):
            shown = mapping.get(str(label))
            key = shown if shown is not None else None
            lanes.append((f"{prefix}{label}" + (f" = {shown}" if shown else ""),
                          [(s.start, s.end, key) for s in hyp.label_timeline(label)]))
        for kind, items in spans.items():
            lanes.append((f"{prefix}{ERROR_NAMES[kind]}", [(a, b, kind) for a, b in items]))
    return lanes


__all__ = ["error_regions", "plot_timelines"]
