"""ONNX export of the streaming step: the builder (`edge/diarization/worker/export.py`,
`edge model export`) on the tiny random-weight model. The daemon-side finder is tested in
test_diarization_exports.py."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from edge.diarization.exports import (
    FEATURES_FILE,
    GRAPH_VERSION,
    INPUTS,
    MARKER,
    ONNX_FILES,
    OUTPUTS,
    export_dir,
    file_entry,
    find_export,
    write_marker,
)
from edge.diarization.model import ModelUnavailable, file_sha256
from tests.helpers.diarization import settings

# --- the builder, on the tiny random-weight model (NeMo, torch, onnxruntime) ---

STEP_PARAMS = {"chunk_len": 10, "chunk_left_context": 2, "chunk_right_context": 2, "fifo_len": 20,
               "spkcache_len": 24, "spkcache_update_period": 10}


@pytest.fixture(scope="module")
def tiny() -> Path:
    from tests.fakes.sortformer import tiny_model_path

    return tiny_model_path()


@pytest.fixture(scope="module")
def exported(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, list[str]]:
    """(settings, ExportResult, progress lines) of one fp32 + int8 export of the tiny model."""
    from edge.diarization.worker.export import export_model

    s = settings(tmp_path_factory.mktemp("cache"), nemo_diar_model_path=tiny)
    lines: list[str] = []
    return s, export_model(s, tiny, quantize="int8", progress=lines.append), lines


@pytest.fixture(scope="module")
def model(exported: tuple[Any, Any, list[str]], tiny: Path) -> Any:
    from edge.diarization.worker.loading import load_model

    return load_model(tiny, exported[0])


def ort_session(path: Path) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run_graph(session: Any, *inputs: Any) -> list[Any]:
    import numpy as np

    feed = {n: np.ascontiguousarray(np.asarray(x)) for n, x in zip(INPUTS, inputs, strict=True)}
    return session.run(list(OUTPUTS), feed)


@pytest.mark.nemo
def test_export_writes_the_files_and_the_marker(exported: tuple[Any, Any, list[str]], tiny: Path,
                                                model: Any) -> None:
    import numpy as np

    s, result, lines = exported
    assert result.status == "exported" and result.folder == export_dir(s, tiny)
    assert sorted(p.name for p in result.folder.iterdir()) == sorted(
        ["model.onnx", "model.int8.onnx", FEATURES_FILE, MARKER])
    assert [line.split(" ")[0] for line in lines] == [
        "loading", "exporting", "fused", "verifying", "fp32", "quantizing", "int8:", "exported"]
    assert lines[2].startswith("fused 2 relative-position and 2 plain attention blocks")
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-4
    marker = json.loads((result.folder / MARKER).read_text())
    assert set(marker) >= {"source_sha256", "source_name", "versions", "opset", "inputs", "outputs",
                           "features", "streaming", "files", "created"}
    assert marker["source_sha256"] == file_sha256(tiny) and marker["source_name"] == tiny.name
    assert set(marker["versions"]) == {"nemo", "torch", "onnx", "onnxruntime"}
    assert marker["graph_version"] == GRAPH_VERSION
    assert marker["opset"] == 17 and marker["inputs"] == list(INPUTS) and marker["outputs"] == list(OUTPUTS)
    for name, meta in marker["files"].items():
        assert meta == file_entry(result.folder / name)
    featurizer = model.preprocessor.featurizer
    assert marker["features"] == {
        "sample_rate": 16000, "n_fft": featurizer.n_fft, "hop_length": featurizer.hop_length,
        "win_length": featurizer.win_length, "preemph": featurizer.preemph,
        "mag_power": featurizer.mag_power, "log_zero_guard": 2.0**-24, "n_mels": 128}
    with np.load(result.folder / FEATURES_FILE) as npz:
        assert np.array_equal(npz["window"], featurizer.window.numpy())
        assert np.array_equal(npz["fb"], featurizer.fb[0].numpy()) and npz["fb"].dtype == np.float32
    mods = model.sortformer_modules
    assert marker["streaming"]["fc_d_model"] == mods.fc_d_model == 64
    assert marker["streaming"]["hidden_size"] == 32 and marker["streaming"]["subsampling_factor"] == 8
    for precision in ("fp32", "int8"):
        assert find_export(s, tiny, precision).onnx == result.folder / ONNX_FILES[precision]  # type: ignore[arg-type]


def nemo_steps(model: Any, params: dict[str, int], seconds: float, seed: int = 3) -> list[dict[str, Any]]:
    """Run NeMo's own streaming forward (`model.forward`, synchronous update) on speech-like
    audio and record each step: its chunk features and lengths, the speaker cache and FIFO it
    started from, and what NeMo computed from them (chunk embeddings, preds over
    cache+FIFO+chunk, the transformer output). Recorded through module hooks and a pass-through
    of NeMo's `streaming_update`; nothing of NeMo's computation is replaced."""
    import torch

    from edge.diarization.worker.streaming import apply_streaming_params
    from tests.helpers.diarization import speechlike

    apply_streaming_params(model, params)
    steps: list[dict[str, Any]] = []
    mods = model.sortformer_modules
    original = mods.streaming_update

    def pre_encode_input(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        steps.append({"chunk": kwargs["x"].clone(), "lengths": kwargs["lengths"].clone()})

    def hidden_output(module: Any, args: Any, output: torch.Tensor) -> None:
        steps[-1]["hidden"] = output.clone()

    def spy(streaming_state: Any, chunk: torch.Tensor, preds: torch.Tensor, **kw: Any) -> Any:
        steps[-1].update(spkcache=streaming_state.spkcache.clone(), fifo=streaming_state.fifo.clone(),
                         embs=chunk.clone(), preds=preds.clone())
        return original(streaming_state=streaming_state, chunk=chunk, preds=preds, **kw)

    hooks = [model.encoder.pre_encode.register_forward_pre_hook(pre_encode_input, with_kwargs=True),
             model.transformer_encoder.register_forward_hook(hidden_output)]
    mods.streaming_update = spy
    try:
        audio = torch.from_numpy(speechlike(seconds, seed=seed))[None]
        with torch.inference_mode():
            model.forward(audio_signal=audio, audio_signal_length=torch.tensor([audio.shape[1]]))
    finally:
        del mods.streaming_update
        for h in hooks:
            h.remove()
    return steps


def assert_graph_matches(onnx_path: Path, model: Any, steps: list[dict[str, Any]]) -> float:
    """The graph (onnxruntime) gives NeMo's preds, chunk embeddings and transformer output for
    every recorded step within 1e-4, and the torch wrapper gives them exactly; returns the
    largest difference seen."""
    import numpy as np
    import torch

    from edge.diarization.worker.export import StepGraph

    session = ort_session(onnx_path)
    graph = StepGraph(model)
    worst = 0.0
    try:
        for st in steps:
            s_len, f_len = st["spkcache"].shape[1], st["fifo"].shape[1]
            inputs = (st["chunk"], st["lengths"], st["spkcache"], torch.tensor([s_len]), st["fifo"],
                      torch.tensor([f_len]))
            preds, embs, embs_lengths, hidden = run_graph(session, *inputs)
            diffs = [np.abs(preds - st["preds"].numpy()).max(), np.abs(embs - st["embs"].numpy()).max(),
                     np.abs(hidden - st["hidden"].numpy()).max()]
            assert max(diffs) <= 1e-4, diffs
            worst = max(worst, *diffs)
            assert embs_lengths.tolist() == [embs.shape[1]]
            with torch.inference_mode():
                wrapped = graph(*inputs)
            assert torch.equal(wrapped[0], st["preds"]) and torch.equal(wrapped[1], st["embs"])
    finally:
        graph.close()
    return float(worst)


@pytest.mark.nemo
def test_graph_equals_nemo_streaming_steps(exported: tuple[Any, Any, list[str]], model: Any) -> None:
    """Every step of NeMo's own streaming forward, with the speaker cache and FIFO filling and
    the cache compressing: the exported graph computes what NeMo's step computes."""
    steps = nemo_steps(model, STEP_PARAMS, 12.0)
    assert len(steps) >= 10
    assert sum(st["spkcache"].shape[1] > 0 and st["fifo"].shape[1] > 0 for st in steps) >= 5
    assert_graph_matches(exported[1].folder / "model.onnx", model, steps)


@pytest.mark.nemo
@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("EDGE_TEST_FULL_MODEL") != "1",
                    reason="full 117.7M model: minutes to export; set EDGE_TEST_FULL_MODEL=1")
def test_full_model_export_equals_nemo_steps(tmp_path: Path) -> None:
    """The same on the full-size random-weight model, at the default streaming parameters."""
    from edge.diarization.worker.export import export_model
    from edge.diarization.worker.loading import load_model
    from tests.fakes.sortformer import full_model_path

    path = full_model_path()
    s = settings(tmp_path / "cache", nemo_diar_model_path=path)
    result = export_model(s, path, progress=lambda line: None)
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-4
    model = load_model(path, s)
    steps = nemo_steps(model, s.diarization_streaming_params(), 40.0)
    assert sum(st["spkcache"].shape[1] > 0 for st in steps) >= 3
    assert_graph_matches(result.folder / "model.onnx", model, steps)


@pytest.mark.nemo
def test_batched_rows_equal_solo_steps(exported: tuple[Any, Any, list[str]], model: Any) -> None:
    """The graph's gather honours each row's lengths: two sessions with different cache and FIFO
    fill, right-padded into one batch, give each session's solo result on its valid frames."""
    import numpy as np

    session = ort_session(exported[1].folder / "model.onnx")
    rng = np.random.default_rng(7)
    chunk = rng.standard_normal((2, 96, 128), dtype=np.float32)
    sizes = [(24, 5), (7, 20)]
    d = model.sortformer_modules.fc_d_model
    caches = [rng.standard_normal((1, s, d), dtype=np.float32) for s, _ in sizes]
    fifos = [rng.standard_normal((1, f, d), dtype=np.float32) for _, f in sizes]

    def padded(parts: list[Any], n: int) -> Any:
        return np.concatenate([np.pad(p, ((0, 0), (0, n - p.shape[1]), (0, 0))) for p in parts])

    batch = run_graph(session, chunk, np.array([96, 96]), padded(caches, 24), np.array([24, 7]),
                      padded(fifos, 20), np.array([5, 20]))
    for row, (s, f) in enumerate(sizes):
        solo = run_graph(session, chunk[row:row + 1], np.array([96]), caches[row], np.array([s]),
                         fifos[row], np.array([f]))
        n = solo[0].shape[1]
        assert np.abs(batch[0][row, :n] - solo[0][0]).max() <= 1e-5
        assert not batch[0][row, n:].any()  # padding frames are masked to 0
        assert np.abs(batch[1][row] - solo[1][0]).max() <= 1e-5


@pytest.mark.nemo
def test_int8_model_loads_and_follows_fp32(exported: tuple[Any, Any, list[str]], model: Any) -> None:
    import numpy as np

    from edge.diarization.worker.export import example_step

    folder = exported[1].folder
    example = [t.numpy() for t in example_step(model)]
    fp32 = run_graph(ort_session(folder / "model.onnx"), *example)[0]
    int8 = run_graph(ort_session(folder / "model.int8.onnx"), *example)[0]
    assert int8.shape == fp32.shape and np.isfinite(int8).all()
    assert (folder / "model.int8.onnx").stat().st_size < (folder / "model.onnx").stat().st_size
    # Random weights are not what int8 is for; still, most decisions must survive it.
    assert ((int8 > 0.5) == (fp32 > 0.5)).mean() >= 0.8


def run_edge(*args: str, cache: Path, limit_bytes: int | None = None, **env: str) -> Any:
    """`python -m edge ARGS` in a child, optionally under RLIMIT_FSIZE (writes past it fail
    with EFBIG at the OS boundary, as a full disk fails them with ENOSPC)."""
    import os
    import subprocess
    import sys

    from tests.helpers.daemon import ROOT, daemon_env

    code = ("import resource, sys\n"
            f"limit = {limit_bytes!r}\n"
            "if limit: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))\n"
            "from edge.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    environ = daemon_env(NEMO_CACHE_DIR=str(cache), EDGE_MODEL_DOWNLOAD="false", **env)
    environ["PYTHONWARNINGS"] = "ignore"
    environ.pop("EDGE_ENV_FILE", None)
    environ["EDGE_ENV_FILE"] = os.devnull
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.nemo
def test_second_run_says_unchanged(exported: tuple[Any, Any, list[str]], tiny: Path) -> None:
    s, result, _ = exported
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in result.folder.iterdir()}
    run = run_edge("model", "export", "--quantize", "int8", cache=s.nemo_cache_dir,
                   NEMO_DIAR_MODEL_PATH=str(tiny))
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f"unchanged: {result.folder} (features.npz 0.1 MB, model.int8.onnx ")
    assert "loading" not in run.stderr
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in result.folder.iterdir()} == before


@pytest.mark.nemo
def test_full_disk_leaves_nothing_half_written(exported: tuple[Any, Any, list[str]], tiny: Path,
                                               tmp_path: Path) -> None:
    """A write that the OS refuses mid-export (RLIMIT_FSIZE: EFBIG, the same path as ENOSPC)
    gives one line, exit 1, and leaves no folder and no temp folder behind."""
    s = exported[0]
    out = tmp_path / "out" / "export"
    run = run_edge("model", "export", "--out", str(out), cache=s.nemo_cache_dir,
                   limit_bytes=1_000_000, NEMO_DIAR_MODEL_PATH=str(tiny))
    assert run.returncode == 1, run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last == (f"edge: export failed: cannot write the export into {out.parent}: File too large "
                    "(disk full or file size limit); nothing was changed")
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.nemo
def test_failed_int8_keeps_the_fp32_export(exported: tuple[Any, Any, list[str]], tiny: Path,
                                           tmp_path: Path) -> None:
    """Adding int8 to an fp32 export reuses model.onnx; when the int8 write fails, the fp32
    export is still there, complete and verified."""
    import shutil

    s, result, _ = exported
    out = tmp_path / "w" / "export"
    out.parent.mkdir()
    shutil.copytree(result.folder, out)
    (out / "model.int8.onnx").unlink()
    marker = json.loads((out / MARKER).read_text())
    del marker["files"]["model.int8.onnx"]
    write_marker(out, marker)
    with pytest.raises(ModelUnavailable, match="has no int8 model"):
        find_export(s, tiny, "int8", folder=out)
    run = run_edge("model", "export", "--quantize", "int8", "--out", str(out), cache=s.nemo_cache_dir,
                   limit_bytes=2_000_000, NEMO_DIAR_MODEL_PATH=str(tiny))
    assert run.returncode == 1, run.stderr
    # The first write of the int8 step is the prepared graph's scratch copy (worker/quantize.py),
    # written from Python, so the full disk is named as such. (Were only the quantizer's own
    # shape-inferred copy to fail, written from C++, it would surface as a DecodeError.)
    assert run.stderr.strip().splitlines()[-1] == (
        f"edge: export failed: cannot write the export into {out.parent}: File too large "
        "(disk full or file size limit); nothing was changed")
    assert sorted(p.name for p in out.parent.iterdir()) == ["export"]
    assert find_export(s, tiny, "fp32", folder=out).marker == marker
    # Without the limit the same command adds int8 next to the reused fp32 model.
    run = run_edge("model", "export", "--quantize", "int8", "--out", str(out), cache=s.nemo_cache_dir,
                   NEMO_DIAR_MODEL_PATH=str(tiny))
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f"exported: {out} ") and "reusing" in run.stderr
    now = find_export(s, tiny, "int8", folder=out).marker
    assert now["files"]["model.onnx"] == marker["files"]["model.onnx"]


def test_export_of_a_missing_model_is_usage_error(tmp_path: Path) -> None:
    run = run_edge("model", "export", "--model", str(tmp_path / "no.nemo"), cache=tmp_path / "cache")
    assert run.returncode == 2
    assert run.stderr.strip() == f"edge: --model {tmp_path / 'no.nemo'}: file does not exist"


def test_export_without_any_model_exits_1_saying_none_is_set(tmp_path: Path) -> None:
    run = run_edge("model", "export", cache=tmp_path / "cache")
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1].startswith(
        "edge: model unavailable: no model: NEMO_DIAR_MODEL_PATH is unset")
