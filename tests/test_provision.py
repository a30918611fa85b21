"""edge/provision.py (what install.sh reads) against simulated machines (tests/fakes/machine.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from edge import provision
from tests.fakes.machine import sd_card_jetson


def _probe(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, str], str]:
    rc = provision.main(["probe", *argv])
    out, err = capsys.readouterr()
    facts: dict[str, str] = {}
    for line in out.splitlines():
        key, _, value = line.partition("=")
        facts[key] = value if key not in facts else facts[key] + "\n" + value
    return rc, facts, err


def test_probe_prints_the_choice_for_install_sh(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    m = sd_card_jetson(tmp_path, nvme_free_mb=200_000)
    rc, facts, _ = _probe(capsys, "--root", str(tmp_path), "--df", str(m.df_path))
    assert rc == 0
    assert facts["platform"] == "jetson" and facts["jetpack"] == "6.1"
    assert (facts["cache_dir"], facts["cache_managed"], facts["cache_kind"]) == (
        "/mnt/nvme/edge-cache", "no", "nvme",
    )
    assert (facts["memory_high"], facts["memory_max"]) == ("2573M", "3216M")


def test_probe_env_file_wins_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    m = sd_card_jetson(tmp_path, nvme_free_mb=200_000)
    env = tmp_path / "edge.env"
    env.write_text('# comment\nNEMO_CACHE_DIR="/var/cache/edge"\nEDGE_DIARIZATION_MEMORY_MB=4096\n')
    rc, facts, _ = _probe(capsys, "--root", str(tmp_path), "--df", str(m.df_path),
                          "--env-file", str(env), "--cache-dir", "/mnt/nvme/models")
    assert rc == 0
    assert (facts["cache_dir"], facts["cache_source"], facts["cache_managed"]) == (
        "/var/cache/edge", "env-file", "yes",
    )
    assert (facts["memory_high"], facts["memory_max"]) == ("4826M", "6032M")
    assert re.search(r"NEMO_CACHE_DIR=/var/cache/edge and is never overwritten", facts["warning"])
    assert "on the sd card" in facts["warning"]


@pytest.mark.parametrize(("argv", "message"), [
    (("--venv", "nemo"), "not enough free space for the venv at /opt/edge: 20000 MB free, "
                         "30000 MB needed"),
    (("--check-cache-space", "--need-cache-mb", "25000"),
     "not enough free space for the model cache at /var/cache/edge: 20000 MB free, 25000 MB"),
])
def test_probe_low_disk_is_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], message: str
) -> None:
    m = sd_card_jetson(tmp_path)
    rc, facts, err = _probe(capsys, "--root", str(tmp_path), "--df", str(m.df_path),
                            "--venv-dir", "/opt/edge", "--need-venv-mb",
                            "30000" if "nemo" in argv else "0", *argv)
    assert rc == provision.NO_SPACE and facts == {}
    assert err.startswith(message) and err.count("\n") == 1


def test_read_env_file_reads_what_systemd_reads(tmp_path: Path) -> None:
    env = tmp_path / "e.env"
    env.write_text("A=1\n  # c\n; c\nB='two words'\nexport C=x\nBAD LINE\nD=\n")
    assert provision.read_env_file(env) == {"A": "1", "B": "two words", "C": "x", "D": ""}
    assert provision.read_env_file(tmp_path / "absent") == {}


def test_online_is_false_for_a_closed_port() -> None:
    assert provision.online("http://127.0.0.1:9/", timeout=1) is False
