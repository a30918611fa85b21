"""The daemon-side export finder (`edge/diarization/exports.py`) on hand-made export folders (no
torch): where an export lives, what verifies it, and the one-line reason for each refusal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from edge.diarization.exports import (
    FEATURES_FILE,
    MARKER,
    ONNX_FILES,
    export_dir,
    export_status,
    find_export,
    write_marker,
)
from edge.diarization.model import ModelUnavailable, file_sha256
from tests.helpers.diarization import hand_made_export, one_line, settings


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "diar_model.nemo"
    path.write_bytes(b"not really a checkpoint, but hashed like one")
    return path


def test_export_dir_is_named_after_the_source_and_its_sha(tmp_path: Path, source: Path) -> None:
    s = settings(tmp_path / "cache")
    expected = tmp_path / "cache" / "exported" / f"diar_model-{file_sha256(source)[:12]}"
    assert export_dir(s, source) == expected


def test_found_export_is_verified(tmp_path: Path, source: Path) -> None:
    s = settings(tmp_path / "cache")
    marker = hand_made_export(export_dir(s, source), source, ("fp32", "int8"))
    for precision in ("fp32", "int8"):
        found = find_export(s, source, precision)  # type: ignore[arg-type]
        assert found.onnx == export_dir(s, source) / ONNX_FILES[precision]
        assert found.features == export_dir(s, source) / FEATURES_FILE
        assert found.marker == marker
    assert export_status(s, source, "int8")[0] is not None


def test_a_missing_export_says_to_run_edge_model_export(tmp_path: Path, source: Path) -> None:
    s = settings(tmp_path / "cache")
    with pytest.raises(ModelUnavailable) as exc:
        find_export(s, source)
    assert one_line(exc) == f"no export in {export_dir(s, source)}: run `edge model export`"
    found, reason = export_status(s, source)
    assert found is None and reason == str(exc.value)


def test_a_missing_source_checkpoint_is_named(tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailable) as exc:
        find_export(settings(tmp_path / "cache"), tmp_path / "gone.nemo")
    assert one_line(exc) == f"{tmp_path / 'gone.nemo'}: No such file or directory"


def test_no_marker_is_an_incomplete_export(tmp_path: Path, source: Path) -> None:
    s = settings(tmp_path / "cache")
    hand_made_export(export_dir(s, source), source)
    (export_dir(s, source) / MARKER).unlink()
    with pytest.raises(ModelUnavailable) as exc:
        find_export(s, source)
    assert "is incomplete (no edge-export.json)" in one_line(exc)


def test_missing_precision_says_how_to_make_it(tmp_path: Path, source: Path) -> None:
    s = settings(tmp_path / "cache")
    hand_made_export(export_dir(s, source), source, ("fp32",))
    with pytest.raises(ModelUnavailable) as exc:
        find_export(s, source, "int8")
    assert one_line(exc).endswith(
        "has no int8 model (model.int8.onnx): run `edge model export --quantize int8`")
    with pytest.raises(ModelUnavailable, match=r"unknown precision 'fp16' \(fp32 \| int8\)"):
        find_export(s, source, "fp16")  # type: ignore[arg-type]


def test_a_truncated_export_file_is_refused_with_its_sizes(tmp_path: Path, source: Path) -> None:
    s = settings(tmp_path / "cache")
    hand_made_export(export_dir(s, source), source)
    onnx = export_dir(s, source) / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:500])
    with pytest.raises(ModelUnavailable) as exc:
        find_export(s, source)
    assert one_line(exc).endswith("model.onnx is truncated or altered (500 bytes, the marker says 1000)")


def test_a_deleted_export_file_is_named(tmp_path: Path, source: Path) -> None:
    s = settings(tmp_path / "cache")
    hand_made_export(export_dir(s, source), source)
    (export_dir(s, source) / FEATURES_FILE).unlink()
    with pytest.raises(ModelUnavailable) as exc:
        find_export(s, source)
    assert one_line(exc).endswith(f"{FEATURES_FILE}: No such file or directory")


def test_an_altered_file_of_the_same_size_is_caught_by_its_hash(tmp_path: Path, source: Path) -> None:
    s = settings(tmp_path / "cache")
    hand_made_export(export_dir(s, source), source)
    onnx = export_dir(s, source) / "model.onnx"
    data = bytearray(onnx.read_bytes())
    data[10] ^= 0xFF
    onnx.write_bytes(bytes(data))
    with pytest.raises(ModelUnavailable) as exc:
        find_export(s, source)
    assert "model.onnx is altered (SHA-256 " in one_line(exc)
    # Sizes alone cannot see it: that is what check_hashes=False gives up.
    assert find_export(s, source, check_hashes=False).onnx == onnx


@pytest.mark.parametrize("text, why", [
    ("{\"source_sha256\": ", "not JSON"),
    ("[1, 2]", "not a JSON object"),
    ("{}", "'source_sha256' missing or not a str"),
])
def test_a_corrupt_marker_is_refused_naming_the_marker(
    tmp_path: Path, source: Path, text: str, why: str,
) -> None:
    s = settings(tmp_path / "cache")
    hand_made_export(export_dir(s, source), source)
    (export_dir(s, source) / MARKER).write_text(text)
    with pytest.raises(ModelUnavailable) as exc:
        find_export(s, source)
    assert one_line(exc).startswith(f"{export_dir(s, source) / MARKER} is corrupt (")
    assert why in str(exc.value)


@pytest.mark.parametrize("key, value, why", [
    ("opset", "17", "'opset' missing or not a int"),
    ("files", {"model.onnx": 5}, "files['model.onnx'] is not {size, sha256}"),
    ("files", {"../model.onnx": {"size": 1, "sha256": "x"}}, "files['../model.onnx'] is not"),
])
def test_a_marker_with_wrong_types_is_refused_saying_why(
    tmp_path: Path, source: Path, key: str, value: Any, why: str,
) -> None:
    s = settings(tmp_path / "cache")
    marker = hand_made_export(export_dir(s, source), source)
    marker[key] = {**marker[key], **value} if key == "files" else value
    (export_dir(s, source) / MARKER).write_text(json.dumps(marker))
    with pytest.raises(ModelUnavailable) as exc:
        find_export(s, source)
    assert why in one_line(exc)


def test_an_export_of_another_checkpoint_is_refused(tmp_path: Path, source: Path) -> None:
    s = settings(tmp_path / "cache")
    other = tmp_path / "other.nemo"
    other.write_bytes(b"another checkpoint")
    # Someone copied (or --out-exported) another model's export into this model's folder.
    hand_made_export(export_dir(s, source), other)
    with pytest.raises(ModelUnavailable) as exc:
        find_export(s, source)
    assert one_line(exc) == (
        f"export {export_dir(s, source)} was made from SHA-256 {file_sha256(other)}, "
        f"not from diar_model.nemo ({file_sha256(source)}): run `edge model export`"
    )


def test_an_export_with_other_outputs_is_refused(tmp_path: Path, source: Path) -> None:
    s = settings(tmp_path / "cache")
    hand_made_export(export_dir(s, source), source, outputs=["preds"])
    with pytest.raises(ModelUnavailable) as exc:
        find_export(s, source)
    assert ("outputs ['preds'] are not ['preds', 'chunk_embs', 'chunk_embs_lengths', 'hidden']"
            in one_line(exc))


def test_an_explicit_folder_is_used_instead_of_the_cache(tmp_path: Path, source: Path) -> None:
    s = settings(tmp_path / "cache")
    hand_made_export(tmp_path / "elsewhere", source)
    assert find_export(s, source, folder=tmp_path / "elsewhere").folder == tmp_path / "elsewhere"


def test_write_marker_refuses_an_incomplete_marker(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="marker key 'source_sha256' missing"):
        write_marker(tmp_path, {"opset": 17})
    assert not (tmp_path / MARKER).exists()
