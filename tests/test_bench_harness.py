"""scripts/bench/harness.py: results record no path that only means something on one machine."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import pytest

from scripts.bench.harness import ROOT, emit, portable


def test_paths_in_the_checkout_become_relative_to_it() -> None:
    result = {"command": f"{ROOT}/.venv/bin/python scripts/bench/x.py --model "
                         f"{ROOT}/.cache/test-models/full-723f4a4efb1e.nemo",
              "runs": [{"plan": f"onnx fp32 ({ROOT}/.cache/bench/exported/m/model.onnx)"}]}
    assert portable(result) == {
        "command": ".venv/bin/python scripts/bench/x.py --model .cache/test-models/full-723f4a4efb1e.nemo",
        "runs": [{"plan": "onnx fp32 (.cache/bench/exported/m/model.onnx)"}]}


def test_other_checkouts_given_as_roots_are_relative_too() -> None:
    other = Path("/work/wt/elsewhere")
    assert portable({f"{other}/a.nemo": f"--cache {other}/.cache/x"}, roots=(ROOT, other)) == {
        "a.nemo": "--cache .cache/x"}


def test_files_elsewhere_keep_their_name_and_sha256() -> None:
    with tempfile.TemporaryDirectory(dir=Path.home()) as folder:
        model = Path(folder) / "model.onnx"
        model.write_bytes(b"weights")
        sha = hashlib.sha256(b"weights").hexdigest()[:12]
        assert portable([str(model), f"--out {folder}/out.json", f"--cache {folder}"]) == [
            f"model.onnx (sha256 {sha})", "--out out.json", f"--cache {Path(folder).name}"]


@pytest.mark.parametrize("text", [
    "/dev/null", "/usr/bin/python3", "ws://127.0.0.1:9/v1/listen", "/v1/listen",
    "speech/v1 and 1/2", "EDGE_ENV_FILE=/dev/null",
])
def test_system_paths_urls_and_other_slashes_stay(text: str) -> None:
    assert portable({"x": text}) == {"x": text}


def test_emit_writes_and_prints_the_portable_json(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.json"
    emit({"model": f"{ROOT}/.cache/m.nemo", "rtf": 0.5}, out)
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text()) == {"model": ".cache/m.nemo", "rtf": 0.5}
