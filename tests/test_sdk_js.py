"""Deepgram's JavaScript SDK (npm `@deepgram/sdk`, in node) live against the daemon.

The test run installs the pinned SDK with npm into `<repo>/.cache/npm-deepgram` (gitignored;
installed once, into a temporary folder renamed into place, so parallel runs are safe) and
runs tests/js/live.cjs: live transcription with diarize, interim_results, utterance_end_ms
and endpointing, through the fake Google service.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.google_speech import encode
from tests.helpers.daemon import KEY, ROOT, with_fake_google
from tests.helpers.end_of_speech import GROUPS, check_groups, end_of_speech_sequence

SDK = "@deepgram/sdk@5.13.0"  # the version docs/notes/deepgram-compat.md was checked with
CACHE = ROOT / ".cache" / "npm-deepgram"


def node_modules() -> Path:
    """The SDK's node_modules, installed with npm on first use."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.fail("node and npm are needed (scripts/test.sh installs them)")
    target = CACHE / SDK.replace("/", "+")
    if not (target / "node_modules" / "@deepgram" / "sdk" / "package.json").is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=CACHE))
        proc = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(tmp),
                               SDK], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        try:
            tmp.rename(target)
        except OSError:  # another run got there first
            shutil.rmtree(tmp, ignore_errors=True)
    return target / "node_modules"


async def run_js(port: int, audio: bytes, options: dict[str, str], tmp: Path
                 ) -> list[dict[str, Any]]:
    path = tmp / "audio.pcm"
    path.write_bytes(audio)
    proc = await asyncio.create_subprocess_exec(
        "node", str(ROOT / "tests" / "js" / "live.cjs"), f"127.0.0.1:{port}", KEY, str(path),
        json.dumps(options), env={**os.environ, "NODE_PATH": str(node_modules())},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert not err.strip(), err.decode()[-2000:]  # no "unhandled message" complaints
    return [json.loads(line) for line in out.decode().splitlines()]


async def test_the_js_sdk_gets_end_of_speech_interims_and_labels(tmp_path: Path) -> None:
    audio, script = encode(GROUPS)
    node_modules()  # install before the daemon starts (npm may take a while)
    async with with_fake_google(edge_stt_api="v1", edge_stt_language="en-US",
                                edge_stt_model="latest_long") as app:
        lines = await run_js(app.server.port, audio, {
            "diarize": "true", "interim_results": "true", "utterance_end_ms": "1000",
            "endpointing": "500"}, tmp_path)
    assert lines[-1] == {"closed": 1000}
    messages = lines[:-1]
    assert not [m for m in messages if "error" in m]
    assert {m["type"] for m in messages} <= {"Results", "UtteranceEnd", "Metadata"}
    assert messages[-1]["type"] == "Metadata"
    check_groups(end_of_speech_sequence(messages), script)
    assert any(not m["is_final"] for m in messages if m["type"] == "Results")
    words = [w for m in messages if m["type"] == "Results" and m["is_final"]
             for w in m["channel"]["alternatives"][0]["words"]]
    assert [w["word"] for w in words] == [s.text for s in script]
    assert words[0]["speaker"] == 0 and all(isinstance(w["speaker"], int) for w in words)
