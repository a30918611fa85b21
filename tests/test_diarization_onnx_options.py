"""ONNX Runtime options of the onnx worker runtime that need no model: providers and parameter
limits (worker/onnx_streaming.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

ort = pytest.importorskip("onnxruntime")

from edge.diarization.worker.onnx_streaming import (  # noqa: E402
    CPU_PROVIDER,
    GPU_PROVIDERS,
    check_streaming_params,
    choose_providers,
)

NO_GPU = not set(GPU_PROVIDERS) & set(ort.get_available_providers())


def test_cpu_is_the_default_and_needs_no_word(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="edge.diarization.worker"):
        assert choose_providers("cpu", tmp_path) == ([CPU_PROVIDER], "cpu")
    assert caplog.records == []


@pytest.mark.skipif(not NO_GPU, reason="this onnxruntime has a GPU provider")
def test_cuda_without_a_gpu_provider_logs_one_line_and_runs_on_the_cpu(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="edge.diarization.worker"):
        assert choose_providers("auto", tmp_path) == ([CPU_PROVIDER], "cpu")
        assert caplog.records == []  # auto: the CPU is an answer, not a problem
        assert choose_providers("cuda", tmp_path) == ([CPU_PROVIDER], "cpu")
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert record.message.startswith("EDGE_DIARIZATION_DEVICE=cuda but this onnxruntime has no CUDA")
    assert not (tmp_path / "tensorrt").exists()


@pytest.mark.skipif(NO_GPU, reason="needs onnxruntime with the CUDA or TensorRT provider")
def test_cuda_uses_the_gpu_provider_with_engines_in_the_cache(tmp_path: Path) -> None:
    providers, device = choose_providers("cuda", tmp_path)
    assert device == "cuda" and providers[-1] == CPU_PROVIDER
    names = [p[0] if isinstance(p, tuple) else p for p in providers]
    assert names[0] in GPU_PROVIDERS
    if names[0] == "TensorrtExecutionProvider":
        assert (tmp_path / "tensorrt").is_dir()


def test_streaming_parameter_limits_name_the_parameter() -> None:
    good = {"chunk_len": 6, "chunk_left_context": 1, "chunk_right_context": 7, "fifo_len": 20,
            "spkcache_len": 40, "spkcache_update_period": 10}
    check_streaming_params(good, n_spk=4, sil_frames_per_spk=3)
    with pytest.raises(ValueError, match="spkcache_len must be at least 16, got 12"):
        check_streaming_params({**good, "spkcache_len": 12}, n_spk=4, sil_frames_per_spk=3)
    with pytest.raises(ValueError, match="chunk_len must be at least 1, got 0"):
        check_streaming_params({**good, "chunk_len": 0}, n_spk=4, sil_frames_per_spk=3)
    with pytest.raises(ValueError, match="fifo_len must be an integer"):
        check_streaming_params({**good, "fifo_len": 2.5}, n_spk=4, sil_frames_per_spk=3)  # type: ignore[dict-item]
