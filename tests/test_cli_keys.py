"""`edge status` against a real daemon: where the client's key comes from (issue 14, item 16)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers.daemon import KEY, OURS, ROOT, daemon_process


def status(port: int, tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`edge status --once` as an operator's shell runs it: none of the daemon's settings."""
    base = {k: v for k, v in os.environ.items() if not OURS.match(k)}
    empty = tmp_path / "empty.env"
    empty.write_text("")
    base.update(EDGE_ENV_FILE=str(empty), **env)
    return subprocess.run(
        [sys.executable, "-m", "edge", "status", "--once", "--url", f"ws://127.0.0.1:{port}", *args],
        cwd=ROOT, env=base, capture_output=True, text=True, timeout=60, check=False,
    )


def test_the_key_comes_from_the_environment_or_a_file_and_on_the_command_line_is_warned_about(
    tmp_path: Path,
) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(f"# the room's key\n{KEY}\n")
    key_file.chmod(0o600)
    with daemon_process(STT_ENABLE_NEMO_DIARIZATION_FALLBACK="false") as (_proc, port):
        refused = status(port, tmp_path)
        assert refused.returncode == 1 and "HTTP 401" in refused.stderr
        from_env = status(port, tmp_path, EDGE_API_KEY=KEY)
        assert from_env.returncode == 0, from_env.stderr
        assert json.loads(from_env.stdout.splitlines()[0])["type"] == "Status"
        assert "warning" not in from_env.stderr
        from_file = status(port, tmp_path, "--key-file", str(key_file))
        assert from_file.returncode == 0 and "warning" not in from_file.stderr, from_file.stderr
        # The file wins over the environment.
        assert status(port, tmp_path, "--key-file", str(key_file), EDGE_API_KEY="wrong").returncode == 0
        argv = status(port, tmp_path, "--key", KEY)
        assert argv.returncode == 0
        assert argv.stderr.startswith("edge: warning: --key shows the key to every local user")
    missing = status(port, tmp_path, "--key-file", str(tmp_path / "nope"))
    assert (missing.returncode, missing.stderr) == (
        2, f"edge: --key-file {tmp_path / 'nope'}: No such file or directory\n")
    key_file.write_text("# nothing yet\n\n")
    empty = status(port, tmp_path, "--key-file", str(key_file))
    assert empty.returncode == 2 and "no key in it" in empty.stderr
