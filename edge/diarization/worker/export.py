"""Export the network part of one streaming Sortformer step to ONNX (worker side: torch, NeMo,
onnx, onnxruntime).

The graph is NeMo's `forward_streaming_step` without the host-side cache update
(`streaming_update`): pre-encode the chunk, join it to the speaker-cache and FIFO embeddings,
run the FastConformer encoder, the Transformer and the speaker head (NeMo's own `frontend_encoder`
and `forward_infer`), and mask. Its interface is `exports.INPUTS` / `exports.OUTPUTS`
(docs/notes/onnx-export.md). NeMo's own `export()` / `streaming_export()` fail for this model
(NVIDIA-NeMo#15077, #15536, #15194), so the wrapper is exported with `torch.onnx.export`
(TorchScript exporter, opset 17, dynamic batch and lengths).

The folder is built in a temporary sibling and renamed into place, the marker written last:
a reader sees the old export, the new one, or none, never half of one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from edge.diarization.exports import (
    FEATURES_FILE,
    GRAPH_VERSION,
    INPUTS,
    ONNX_FILES,
    OPSET,
    OUTPUTS,
    Precision,
    export_dir,
    file_entry,
    find_export,
    write_marker,
)
from edge.diarization.model import (
    SPACE_MARGIN,
    ModelUnavailable,
    file_sha256,
    first_line,
    remove_dead_temporaries,
    replace_folder,
)
from edge.diarization.worker.attention_fusion import fuse_attention_file
from edge.diarization.worker.features import IncrementalFeatures
from edge.diarization.worker.loading import load_model
from edge.diarization.worker.quantize import compare_onnx, quantize_int8
from edge.diarization.worker.speaker_cache import AOSC_NAMES, CacheParams
from edge.diarization.worker.stream_core import STREAMING_PARAM_NAMES
from edge.settings import Settings

Progress = Callable[[str], None]
# The fp32 graph must reproduce the torch wrapper this closely on the check step, or the export
# is refused (measured: ~1e-6 on the tiny and full random-weight models).
MAX_VERIFY_DIFF = 1e-4
# With int8: the prepared graph (1x), the quantizer's shape-inferred copy of it (1x) and the
# int8 file (~0.3x), beside model.onnx.
INT8_SPACE_FACTOR = 2.4


class ExportError(Exception):
    """The export could not be written; `str()` is a one-line operator-facing reason."""


@dataclass(frozen=True)
class ExportResult:
    """What `export_model` did: `status` is `exported` or `unchanged`; `files` maps each file
    of the folder to its size in bytes; `max_abs_diff` is fp32 ONNX vs the torch wrapper on the
    check step (None when unchanged)."""

    folder: Path
    status: Literal["exported", "unchanged"]
    files: dict[str, int]
    seconds: float
    max_abs_diff: float | None = None
    int8_max_abs_diff: float | None = None


class StepGraph(torch.nn.Module):
    """One streaming step's network part, as a module `torch.onnx.export` can trace.

    `forward(chunk [B,T,n_mels], chunk_lengths [B], spkcache [B,S,D], spkcache_lengths [B],
    fifo [B,F,D], fifo_lengths [B])` returns `(preds [B,S+F+C,n_spk], chunk_embs [B,C,D],
    chunk_embs_lengths [B], hidden [B,S+F+C,H])`.
    """

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model
        self._hidden: torch.Tensor | None = None
        # `forward_infer` does not return the transformer output that folding needs; catch it
        # on its way into the speaker head, so NeMo's own code runs unchanged.
        self._hook = model.transformer_encoder.register_forward_hook(self._keep_hidden)

    def _keep_hidden(self, module: Any, args: Any, output: torch.Tensor) -> None:
        self._hidden = output

    def close(self) -> None:
        """Remove the hook this wrapper put on the model."""
        self._hook.remove()

    def forward(self, chunk: torch.Tensor, chunk_lengths: torch.Tensor, spkcache: torch.Tensor,
                spkcache_lengths: torch.Tensor, fifo: torch.Tensor, fifo_lengths: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        m = self.model
        embs, lengths = m.encoder.pre_encode(x=chunk, lengths=chunk_lengths)
        lengths = lengths.to(torch.int64)
        joined, joined_lengths = pack(spkcache, spkcache_lengths, fifo, fifo_lengths, embs, lengths)
        enc, enc_lengths = m.frontend_encoder(
            processed_signal=joined, processed_signal_length=joined_lengths, bypass_pre_encode=True,
        )
        preds = m.forward_infer(emb_seq=enc, emb_seq_length=enc_lengths)
        preds = m.sortformer_modules.apply_mask_to_preds(preds, enc_lengths)
        assert self._hidden is not None
        hidden, self._hidden = self._hidden, None
        return preds, embs, lengths, hidden


def pack(spkcache: torch.Tensor, spkcache_lengths: torch.Tensor, fifo: torch.Tensor,
         fifo_lengths: torch.Tensor, chunk: torch.Tensor, chunk_lengths: torch.Tensor
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's valid cache, FIFO and chunk frames, back to back, zeros after; and the lengths.

    A loop-free gather in place of NeMo's scripted `concat_and_pad` (which does not export).
    When every length is its tensor's full length (batch 1, NeMo's synchronous path) it is
    exactly `torch.cat((spkcache, fifo, chunk), dim=1)`.
    """
    s, f = spkcache.shape[1], fifo.shape[1]
    joined = torch.cat((spkcache, fifo, chunk), dim=1)
    n = joined.shape[1]
    j = torch.arange(n, device=joined.device).unsqueeze(0)
    sl, fl, cl = spkcache_lengths.unsqueeze(1), fifo_lengths.unsqueeze(1), chunk_lengths.unsqueeze(1)
    src = torch.where(j < sl, j, torch.where(j < sl + fl, j - sl + s, j - sl - fl + s + f))
    src = src.clamp(max=n - 1)
    valid = (j < sl + fl + cl).unsqueeze(-1).to(joined.dtype)
    packed = torch.gather(joined, 1, src.unsqueeze(-1).expand(-1, -1, joined.shape[2])) * valid
    return packed, spkcache_lengths + fifo_lengths + chunk_lengths


def export_model(settings: Settings, model_path: Path, out_dir: Path | None = None,
                 quantize: Literal["int8"] | None = None, progress: Progress | None = None
                 ) -> ExportResult:
    """Export the `.nemo` at `model_path` into `out_dir` (default `exports.export_dir`).

    Writes `model.onnx`, `features.npz`, with `quantize="int8"` also `model.int8.onnx`, then the
    marker. Does nothing (`unchanged`) when a verified export of this checkpoint with the asked
    precisions is there; adding int8 to an fp32 export reuses its `model.onnx`. Progress lines
    go to `progress` (default: stderr). Raises `ModelUnavailable` (the model cannot be loaded)
    or `ExportError` (disk full, unwritable folder, graph that does not reproduce the model).
    """
    say = progress or _stderr
    start = time.perf_counter()
    try:
        sha = file_sha256(model_path)
    except OSError as exc:
        raise ModelUnavailable(f"{model_path}: {exc.strerror or exc}") from exc
    folder = out_dir if out_dir is not None else export_dir(settings, model_path, sha)
    wanted: list[Precision] = ["fp32", "int8"] if quantize == "int8" else ["fp32"]
    have = _valid_precisions(settings, model_path, folder)
    if all(p in have for p in wanted):
        marker = have[wanted[0]]
        say(f"unchanged: {folder} is an export of {model_path.name} ({sha[:12]})")
        return ExportResult(folder, "unchanged", {n: m["size"] for n, m in marker["files"].items()},
                            time.perf_counter() - start)
    tmp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}")
    with _writing(folder, tmp, model_path, quantize):
        reuse = have.get("fp32")
        if reuse is not None:
            say(f"reusing {folder / ONNX_FILES['fp32']}")
            for name in reuse["files"]:
                _link_or_copy(folder / name, tmp / name)
            marker = reuse
            diff = None
        else:
            marker, diff = _build_fp32(settings, model_path, sha, tmp, say)
        int8_diff = None
        if quantize == "int8":
            int8_diff = _quantize(tmp, say)
        marker = {**marker, "files": {n: file_entry(tmp / n) for n in sorted(os.listdir(tmp))},
                  "created": datetime.now(UTC).isoformat(timespec="seconds")}
        write_marker(tmp, marker)
        replace_folder(tmp, folder)
    took = time.perf_counter() - start
    say(f"exported {folder} in {took:.1f} s")
    return ExportResult(folder, "exported", {n: m["size"] for n, m in marker["files"].items()},
                        took, diff, int8_diff)


def verify_step(graph: StepGraph, onnx_path: Path, example: tuple[torch.Tensor, ...]) -> float:
    """Max abs difference between the ONNX file (onnxruntime, CPU) and `graph` on one step,
    over every float output. Raises what onnxruntime raises on a file it cannot load."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    with torch.inference_mode(), _no_typecheck():
        expected = graph(*example)
    got = session.run(list(OUTPUTS), {n: t.numpy() for n, t in zip(INPUTS, example, strict=True)})
    return max(float(np.abs(g - e.numpy()).max()) for g, e in zip(got, expected, strict=True)
               if g.dtype == np.float32 and g.size)


def example_step(model: Any, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random inputs of one step with the checkpoint's streaming parameters, speaker cache and
    FIFO full (the costliest step): what export traces and what verification runs."""
    mods = model.sortformer_modules
    sub = int(model.encoder.subsampling_factor)
    frames = (mods.chunk_len + mods.chunk_left_context + mods.chunk_right_context) * sub
    n_mels = int(model.preprocessor.featurizer.nfilt)
    g = torch.Generator().manual_seed(seed)
    # A FIFO of 0 frames (a preset without one) would trace a graph specialised to that size.
    s, f, d = int(mods.spkcache_len), max(int(mods.fifo_len), int(mods.chunk_len)), int(mods.fc_d_model)

    def lengths(n: int) -> torch.Tensor:
        return torch.tensor([n], dtype=torch.int64)

    return (torch.randn(1, frames, n_mels, generator=g), lengths(frames),
            torch.randn(1, s, d, generator=g), lengths(s), torch.randn(1, f, d, generator=g), lengths(f))


# --- internals ---

def _build_fp32(settings: Settings, model_path: Path, sha: str, tmp: Path, say: Progress
                ) -> tuple[dict[str, Any], float]:
    """Load, export, verify; writes model.onnx and features.npz into `tmp`; returns the marker
    (without files/created) and the verification difference."""
    say(f"loading {model_path}")
    model = load_model(model_path, settings, "cpu")
    graph = StepGraph(model).eval()
    try:
        example = example_step(model)
        features = _features(model, tmp / FEATURES_FILE)
        say(f"exporting the streaming step to ONNX (opset {OPSET})")
        dims = {"chunk": {0: "batch", 1: "chunk_frames"}, "spkcache": {0: "batch", 1: "spkcache_frames"},
                "fifo": {0: "batch", 1: "fifo_frames"}, "preds": {0: "batch", 1: "frames"},
                "chunk_embs": {0: "batch", 1: "chunk_embs_frames"}, "hidden": {0: "batch", 1: "frames"}}
        for name in ("chunk_lengths", "spkcache_lengths", "fifo_lengths", "chunk_embs_lengths"):
            dims[name] = {0: "batch"}
        with torch.inference_mode(), _no_typecheck(), warnings.catch_warnings():
            # Tracer and constant-folding notes: hundreds of lines that hide the progress lines.
            warnings.simplefilter("ignore")
            torch.onnx.export(graph, example, str(tmp / ONNX_FILES["fp32"]), input_names=list(INPUTS),
                              output_names=list(OUTPUTS), dynamic_axes=dims, opset_version=OPSET,
                              dynamo=False, do_constant_folding=True)
        fused = fuse_attention_file(tmp / ONNX_FILES["fp32"])
        say(f"fused {fused['rel_pos_attention']} relative-position and {fused['attention']} plain "
            "attention blocks into onnxruntime's MultiHeadAttention")
        say("verifying the fp32 graph with onnxruntime against the torch wrapper")
        diff = verify_step(graph, tmp / ONNX_FILES["fp32"], example_step(model, seed=1))
        say(f"fp32 max abs diff {diff:.3g}")
        if not diff <= MAX_VERIFY_DIFF:
            raise ExportError(f"the exported graph does not reproduce {model_path.name}: max abs diff "
                              f"{diff:.3g} > {MAX_VERIFY_DIFF:g}")
        mods = model.sortformer_modules
        streaming = {k: int(getattr(mods, k)) for k in STREAMING_PARAM_NAMES}
        streaming.update(fc_d_model=int(mods.fc_d_model), hidden_size=int(mods.tf_d_model),
                         n_spk=int(mods.n_spk), subsampling_factor=int(model.encoder.subsampling_factor))
        # The AOSC constants the host-side cache update reads: the checkpoint's, not the port's defaults.
        aosc = asdict(CacheParams.from_module(mods))
        streaming.update({k: aosc[k] for k in AOSC_NAMES})
    finally:
        graph.close()
    return {
        "source_sha256": sha, "source_name": model_path.name, "versions": _versions(), "opset": OPSET,
        "graph_version": GRAPH_VERSION,
        "inputs": list(INPUTS), "outputs": list(OUTPUTS), "features": features, "streaming": streaming,
        "verify_max_abs_diff": diff,
    }, diff


def _features(model: Any, npz: Path) -> dict[str, Any]:
    """The feature config the numpy front end needs; writes the window and filterbank to `npz`.

    `window` is the checkpoint's STFT window (win_length samples, centred in n_fft by the STFT);
    `fb` the mel filterbank, [n_mels, n_fft // 2 + 1]. Raises `FeatureConfigError` for a front
    end that cannot be computed live."""
    featurizer = model.preprocessor.featurizer
    live = IncrementalFeatures(featurizer)  # validates the front end, reads its constants
    window = live.window.detach().cpu().numpy().astype(np.float32)
    fb = live.fb.detach().cpu().numpy().astype(np.float32).reshape(live.n_mels, -1)
    np.savez(npz, window=window, fb=fb)
    return {"sample_rate": int(featurizer.sample_rate), "n_fft": live.n_fft, "hop_length": live.hop,
            "win_length": live.win_length, "preemph": live.preemph, "mag_power": float(live.mag_power),
            "log_zero_guard": float(live.guard), "n_mels": live.n_mels}


def _quantize(tmp: Path, say: Progress) -> float:
    """Write model.int8.onnx from model.onnx (`quantize.quantize_int8`); returns its max abs
    diff from fp32 on a short random step, as a load check."""
    say("quantizing to int8 (onnxruntime dynamic quantization)")
    fp32, int8 = tmp / ONNX_FILES["fp32"], tmp / ONNX_FILES["int8"]
    try:
        counts = quantize_int8(fp32, int8)
    except OSError:
        raise
    except Exception as exc:
        # The quantizer first writes a shape-inferred copy of the graph beside it from C++,
        # which ignores a failed write: a full disk shows up as that copy failing to parse.
        raise ExportError(f"int8 quantization failed: {type(exc).__name__}: {first_line(exc)} "
                          f"(a full disk in {tmp.parent} shows up this way); nothing was changed") from exc
    say(f"int8: {counts['identity_bypassed']} Identity-shared weights bypassed, "
        f"{counts['pointwise_conv_as_matmul']} pointwise convolutions quantized as MatMul")
    return compare_onnx(fp32, int8)


def _valid_precisions(settings: Settings, model_path: Path, folder: Path) -> dict[str, dict[str, Any]]:
    """{precision: marker} for each precision the export in `folder` verifiably has. An export
    whose marker predates the AOSC constants or the current `GRAPH_VERSION` counts as none: it
    is made again."""
    found = {}
    for precision in ONNX_FILES:
        with contextlib.suppress(ModelUnavailable):
            marker = find_export(settings, model_path, precision,  # type: ignore[arg-type]
                                 folder=folder).marker
            if (all(k in marker["streaming"] for k in AOSC_NAMES)
                    and marker.get("graph_version") == GRAPH_VERSION):
                found[precision] = marker
    return found


@contextlib.contextmanager
def _writing(folder: Path, tmp: Path, model_path: Path, quantize: str | None) -> Iterator[None]:
    """Create `tmp` (after a space check), remove it whatever happens, and turn disk errors
    into one `ExportError` line."""
    parent = folder.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        remove_dead_temporaries(parent)  # of export runs that were killed
        need = int(model_path.stat().st_size * (1 + (INT8_SPACE_FACTOR if quantize else 0))) + SPACE_MARGIN
        free = shutil.disk_usage(parent).free
        if free < need:
            raise ExportError(f"not enough free space in {parent}: need {need / 1e9:.2f} GB, "
                              f"have {free / 1e9:.2f} GB")
        tmp.mkdir()
    except OSError as exc:
        raise ExportError(f"cannot write an export into {parent}: {exc.strerror or exc}") from exc
    try:
        yield
    except OSError as exc:
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
        why = f"{exc.strerror} (disk full or file size limit)" if full else exc.strerror or str(exc)
        raise ExportError(f"cannot write the export into {parent}: {why}; nothing was changed") from exc
    except RuntimeError as exc:
        # torch/onnx wrap failures of their own writes; the OSError is then the cause.
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, OSError):
            raise ExportError(f"cannot write the export into {parent}: {cause.strerror}; "
                              "nothing was changed") from exc
        raise ExportError(f"export failed: {type(exc).__name__}: {first_line(exc)}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _versions() -> dict[str, str]:
    import nemo
    import onnx
    import onnxruntime

    return {"nemo": nemo.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}


@contextlib.contextmanager
def _no_typecheck() -> Iterator[None]:
    # NeMo's neural-type checks compare python-side shapes: noise while tracing, so off, as
    # NeMo's own exporter does.
    from nemo.core.classes.common import typecheck

    with typecheck.disable_checks():
        yield


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


__all__ = ["ExportError", "ExportResult", "StepGraph", "example_step", "export_model", "pack", "verify_step"]
