"""The ONNX Runtime diarizer: the exported streaming step, numpy around it, no torch, no NeMo.

Per step: numpy log-mel features (`numpy_features.py`) -> chunk (shared cutter,
`stream_core.py`) -> the exported network (pre-encode, join with speaker cache + FIFO, encoder,
transformer, speaker head; see ONNX_INTERFACE in `edge.diarization.exports`) -> NeMo's
speaker-cache/FIFO update ported to numpy (`speaker_cache.py`) -> folding (shared). The same
interface as the NeMo runtime's `StreamingDiarizer` / `SessionStream`, so the worker's warm-up,
stats and admission figures work unchanged.

ONNX Runtime options: intra-op threads from `EDGE_DIARIZATION_THREADS` (0: ORT's default);
graph optimizations on, the optimized graph saved beside the export on the first start and
loaded on later ones, its weights memory-mapped (`optimized_path`); CPU by default, TensorRT or CUDA when
`EDGE_DIARIZATION_DEVICE` allows it and the installed onnxruntime has them.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from edge.clock import SLOTS
from edge.diarization.exports import GRAPH_VERSION, OUTPUTS, Export
from edge.diarization.worker.numpy_features import FeatureConfig, NumpyFeatures
from edge.diarization.worker.speaker_cache import (
    AOSC_NAMES,
    CacheParams,
    CacheState,
    streaming_update,
)
from edge.diarization.worker.stream_core import (
    STREAMING_PARAM_NAMES,
    SessionStreamBase,
    check_max_speakers,
)

log = logging.getLogger("edge.diarization.worker")

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
CPU_PROVIDER = "CPUExecutionProvider"


def check_streaming_params(values: dict[str, int], n_spk: int, sil_frames_per_spk: int) -> None:
    """NeMo's `SortformerModules._check_streaming_parameters` limits, without NeMo.

    Raises `ValueError` naming the parameter, its value and the least allowed.
    """
    minimum = {"spkcache_len": (1 + sil_frames_per_spk) * n_spk, "fifo_len": 0, "chunk_len": 1,
               "spkcache_update_period": 1, "chunk_left_context": 0, "chunk_right_context": 0}
    for name, least in minimum.items():
        value = values[name]
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"streaming parameter {name} must be an integer, got {value!r}")
        if value < least:
            raise ValueError(f"streaming parameter {name} must be at least {least}, got {value}")


def choose_providers(device: str, cache_dir: Path) -> tuple[list[Any], str]:
    """ONNX Runtime providers for `EDGE_DIARIZATION_DEVICE` (`auto` | `cpu` | `cuda`) and the
    device name for the READY figures. TensorRT keeps its engines in `cache_dir/tensorrt`.

    Never raises: `cuda` without a GPU provider logs one line and runs on the CPU.
    """
    if device == "cpu":
        return [CPU_PROVIDER], "cpu"
    available = ort.get_available_providers()
    if "TensorrtExecutionProvider" in available:
        engines = cache_dir / "tensorrt"
        engines.mkdir(parents=True, exist_ok=True)
        trt = ("TensorrtExecutionProvider", {"trt_engine_cache_enable": True,
                                             "trt_engine_cache_path": str(engines)})
        return [trt, "CUDAExecutionProvider", CPU_PROVIDER], "cuda"
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", CPU_PROVIDER], "cuda"
    if device == "cuda":
        log.warning("EDGE_DIARIZATION_DEVICE=cuda but this onnxruntime has no CUDA or TensorRT "
                    "provider (it has %s): running on the CPU", ", ".join(available))
    return [CPU_PROVIDER], "cpu"


OPTIMIZED_WEIGHTS = "weights.bin"  # the optimized graph's initializers, beside it


def optimized_path(onnx: Path, device: str) -> Path:
    """Where the optimized graph of `onnx` for this onnxruntime version and device is kept: in
    a folder of its own, with its weights in `OPTIMIZED_WEIGHTS` (external initializers,
    which onnxruntime maps from the file instead of parsing and copying them: for the full model
    opening the session takes 0.47x the CPU and 280 MB less RSS, `scripts/bench/onnx_session.py`)."""
    return onnx.with_name(f"{onnx.stem}.opt-ort{ort.__version__}-{device}") / "model.onnx"


def session_options(threads: int, save_to: Path | None = None) -> ort.SessionOptions:
    """The runtime's ONNX Runtime options: `threads` intra-op threads (0: ORT's default), one
    sequential inter-op thread, all graph optimizations; with `save_to`, the level that is
    saved there (EXTENDED) and the path to save the optimized graph to, with its weights in
    `OPTIMIZED_WEIGHTS` beside it."""
    o = ort.SessionOptions()
    if threads > 0:
        o.intra_op_num_threads = threads
    o.inter_op_num_threads = 1
    o.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # EXTENDED, not ALL, is what gets saved: ALL adds layout changes for this very CPU,
    # which ORT applies again at load from the saved graph (cheap).
    o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if save_to is not None:
        o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        o.optimized_model_filepath = str(save_to)
        o.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                   OPTIMIZED_WEIGHTS)
    o.log_severity_level = 3
    return o


def open_session(onnx: Path, threads: int, providers: list[Any], device: str) -> ort.InferenceSession:
    """An `InferenceSession` for `onnx`: optimized graph from the cache when there is one, else
    optimize now and save it atomically beside the export (a read-only folder only logs).

    Raises `ModelUnavailable` (one line) when onnxruntime cannot load the graph.
    """
    from edge.diarization.model import ModelUnavailable, replace_folder

    cached = optimized_path(onnx, device)

    if cached.is_file() and cached.stat().st_mtime >= onnx.stat().st_mtime:
        try:
            return ort.InferenceSession(str(cached), session_options(threads), providers=providers)
        except Exception as exc:  # a damaged cache file: build it again from the export
            log.warning("optimized graph %s unusable (%s); optimizing again", cached, _first(exc))
    # Built in a temporary folder and renamed into place, never written over: a running worker
    # may have the weights of the one it replaces mapped.
    tmp = cached.parent.with_name(f".{cached.parent.name}.{os.getpid()}.tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        ort.InferenceSession(str(onnx), session_options(threads, tmp / cached.name),
                             providers=providers)
        replace_folder(tmp, cached.parent)
        # The single-file cache of earlier versions (weights inside: ~0.5 GB) is not used now.
        onnx.with_name(f"{cached.parent.name}.onnx").unlink(missing_ok=True)
        return ort.InferenceSession(str(cached), session_options(threads), providers=providers)
    except Exception as exc:
        save_error = _first(exc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    try:  # not saved (read-only folder, full disk) or not loadable: the export itself decides
        session = ort.InferenceSession(str(onnx), session_options(threads), providers=providers)
    except Exception as exc:
        raise ModelUnavailable(f"{onnx.name}: onnxruntime cannot load it: {_first(exc)}") from exc
    log.warning("optimized graph not kept beside %s (%s): every start optimizes again", onnx, save_error)
    return session


class OnnxDiarizer:
    """Owns the ONNX session, the feature front end and the streaming parameters; makes one
    `OnnxSessionStream` per session.

    Accepts a verified `Export`, the streaming parameters (names not given keep the
    checkpoint's, from the marker), the speaker limit (1..4), the thread count (0: ORT's
    default), `EDGE_DIARIZATION_DEVICE` and the cache folder (TensorRT engines).
    Raises `ValueError` for bad parameters or an export this runtime cannot use, and
    `ModelUnavailable` when onnxruntime cannot load the graph.
    """

    runtime = "onnx"

    def __init__(self, export: Export, params: dict[str, int], max_speakers: int = SLOTS,
                 threads: int = 0, device: str = "cpu", cache_dir: Path | None = None) -> None:
        check_max_speakers(max_speakers)
        marker = export.marker
        streaming: dict[str, Any] = dict(marker["streaming"])
        unknown = set(params) - set(STREAMING_PARAM_NAMES)
        if unknown:
            raise ValueError(f"unknown streaming parameters: {sorted(unknown)}")
        if int(streaming.get("n_spk", 0)) != SLOTS:
            raise ValueError(f"export has {streaming.get('n_spk')} speaker slots, expected {SLOTS}")
        merged = {**streaming, **{k: int(v) for k, v in params.items()}}
        missing = [k for k in (*STREAMING_PARAM_NAMES, "fc_d_model", "subsampling_factor") if k not in merged]
        if missing:
            raise ValueError(f"export marker's streaming section lacks {missing}")
        self.cache_params = CacheParams.from_values(merged)
        defaulted = [k for k in AOSC_NAMES if k not in merged]
        if defaulted:
            log.warning("export %s predates recording the speaker-cache (AOSC) constants; using "
                        "NeMo's defaults for %s (`edge model export` again records the checkpoint's)",
                        export.folder, ", ".join(defaulted))
        if marker.get("graph_version") != GRAPH_VERSION:
            log.warning("export %s has graph version %s, this edge makes %d: the same numbers, a slower "
                        "step (`edge model export` again makes the current graph)", export.folder,
                        marker.get("graph_version", 1), GRAPH_VERSION)
        check_streaming_params(merged, SLOTS, self.cache_params.spkcache_sil_frames_per_spk)
        self.params = {k: int(merged[k]) for k in STREAMING_PARAM_NAMES}
        self.max_speakers = max_speakers
        self.subsampling = int(merged["subsampling_factor"])
        self.emb_dim = int(merged["fc_d_model"])
        self.precision = export.precision
        self.features = FeatureConfig.from_export(marker["features"], export.features)
        providers, self.device = choose_providers(device, cache_dir or export.folder)
        self.session = open_session(export.onnx, threads, providers, self.device)

    def new_session(self) -> OnnxSessionStream:
        """A fresh session: empty speaker cache and FIFO, frame 0 at its first sample."""
        return OnnxSessionStream(self)

    def close(self) -> None:
        """Nothing to undo (the NeMo runtime removes a hook here); kept for the same interface."""

    def run_step(self, chunk: np.ndarray, state: CacheState) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The exported network on one chunk (T, n_mels) with `state`'s cache and FIFO;
        returns `(preds (1, S+F+C, 4), chunk_embs (1, C, D), hidden (1, S+F+C, H))`."""
        feed = {
            "chunk": chunk[None], "chunk_lengths": np.array([chunk.shape[0]], np.int64),
            "spkcache": np.ascontiguousarray(state.spkcache),
            "spkcache_lengths": np.array([state.spkcache.shape[1]], np.int64),
            "fifo": np.ascontiguousarray(state.fifo),
            "fifo_lengths": np.array([state.fifo.shape[1]], np.int64),
        }
        preds, embs, _lengths, hidden = self.session.run(list(OUTPUTS), feed)
        return preds, embs, hidden


class OnnxSessionStream(SessionStreamBase):
    """One session on the ONNX runtime: numpy features, numpy cache state, shared chunking and
    folding (`SessionStreamBase`)."""

    def __init__(self, diarizer: OnnxDiarizer) -> None:
        self.d = diarizer
        self.features = NumpyFeatures(diarizer.features)
        super().__init__(diarizer.params, diarizer.subsampling, self.features.n_mels, diarizer.max_speakers)
        self.state = CacheState.empty(diarizer.emb_dim)

    def fill_caches(self, seed: int = 0, overflow: bool = True) -> None:
        """Fill the speaker cache and FIFO with random embeddings, as full as in a session that
        has spoken for `spkcache_len + fifo_len` frames; with `overflow` the next step pushes
        frames into the cache and compresses it. For the worker's warm-up only (the labels
        would be noise); see `SessionStream.fill_caches`."""
        p, d = self.d.params, self.d.emb_dim
        rng = np.random.default_rng(seed)

        def rand(*shape: int) -> np.ndarray:
            return rng.random(shape, dtype=np.float32)

        fifo = p["fifo_len"] if overflow else max(0, p["fifo_len"] - p["chunk_len"])
        st = self.state
        st.spkcache, st.spkcache_preds = rand(1, p["spkcache_len"], d), rand(1, p["spkcache_len"], SLOTS)
        st.fifo, st.fifo_preds = rand(1, fifo, d), rand(1, fifo, SLOTS)

    def _push_features(self, samples: np.ndarray) -> np.ndarray:
        return self.features.push(samples)

    def _finish_features(self) -> np.ndarray:
        return self.features.finish()

    def _step(self, chunk: np.ndarray, left: int, right: int) -> tuple[np.ndarray, np.ndarray | None]:
        st = self.state
        prefix = st.spkcache.shape[1] + st.fifo.shape[1]
        preds, embs, hidden = self.d.run_step(np.ascontiguousarray(chunk, np.float32), st)
        sub = self.d.subsampling
        lc, rc = round(left / sub), math.ceil(right / sub)  # as NeMo's forward_streaming_step
        chunk_preds = streaming_update(self.d.cache_params, st, embs, preds, lc=lc, rc=rc)[0]
        n = chunk_preds.shape[0]
        return chunk_preds, hidden[0, prefix + lc : prefix + lc + n]

    def _state_bytes(self) -> int:
        return self.features.state_bytes() + self.state.nbytes()


def _first(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__


__all__ = ["OnnxDiarizer", "OnnxSessionStream", "check_streaming_params", "choose_providers",
           "open_session", "optimized_path", "session_options"]
