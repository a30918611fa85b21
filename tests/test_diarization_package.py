"""The `edge.diarization` package docstring: the map of its modules stays complete."""

from __future__ import annotations

import re
from pathlib import Path

import edge.diarization


def test_the_package_docstring_names_every_module() -> None:
    package = Path(edge.diarization.__file__).parent
    modules = {p.name for p in package.glob("*.py")} - {"__init__.py"}
    named = set(re.findall(r"`(\w+\.py)`", edge.diarization.__doc__ or ""))
    assert modules - named == set(), "add them to edge/diarization/__init__.py's docstring"
    assert named - modules == set(), "the docstring names modules that do not exist"
