"""The daemon/worker boundary on the import graph: nothing in edge/ outside
edge/diarization/worker/ imports torch, onnxruntime or nemo, not even inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EDGE = ROOT / "edge"
WORKER = EDGE / "diarization" / "worker"
HEAVY = ("torch", "onnxruntime", "nemo")


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import anywhere in the module's AST, function-level included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant)):
            names = [str(node.args[0].value)]
        found += [(node.lineno, n) for n in names]
    return found


def heavy_imports(path: Path) -> list[str]:
    """`file:line module` for every import of a heavy library anywhere in the module's AST."""
    return [f"{path.relative_to(ROOT)}:{line} {n}" for line, n in imports(path)
            if n.split(".")[0] in HEAVY]


def test_only_the_worker_package_imports_torch_onnxruntime_or_nemo() -> None:
    modules = [p for p in EDGE.rglob("*.py") if WORKER not in p.parents]
    assert len(modules) > 20  # the walk really covers the package
    offenders = [hit for p in modules for hit in heavy_imports(p)]
    assert offenders == []


def test_the_walk_sees_function_level_imports(tmp_path: Path) -> None:
    probe = ROOT / "edge" / "diarization" / "worker" / "onnx_streaming.py"
    assert any("onnxruntime" in hit for hit in heavy_imports(probe))
    loading = ROOT / "edge" / "diarization" / "worker" / "loading.py"
    assert any(hit.endswith(" torch") for hit in heavy_imports(loading))  # inside functions there


def test_the_diarizer_side_does_not_import_the_upstream() -> None:
    """The diarizer shares only the session clock with the Google side (edge/clock.py)."""
    modules = list((EDGE / "diarization").rglob("*.py"))
    assert len(modules) > 10
    offenders = [f"{p.relative_to(ROOT)}:{line} {n}" for p in modules for line, n in imports(p)
                 if n == "edge.stt" or n.startswith("edge.stt.")]
    assert offenders == []


def test_the_clock_is_pure() -> None:
    """edge/clock.py is imported by the daemon and the worker alike: standard library only."""
    found = {n.split(".")[0] for _, n in imports(EDGE / "clock.py")}
    assert found <= {"__future__", "bisect", "dataclasses", "typing"}, found
