"""install.sh and systemd/edge.service, driven as an operator (or an image build) would.

Every install goes into a --destdir. One builds a real venv with the project and its
dependencies (--no-nemo: pip takes them from the local index, no torch, no NeMo); the others
pass `--no-deps` through EDGE_INSTALL_PIP_ARGS, since they test the steps around pip.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fakes.machine import sd_card_jetson
from tests.helpers.daemon import OURS, ROOT

INSTALL = ROOT / "install.sh"
UNIT = "etc/systemd/system/edge.service"
DROPINS = "etc/systemd/system/edge.service.d"
ENV_FILE = "etc/edge/edge.env"
SYSUSERS = "usr/lib/sysusers.d/edge.conf"
VENV = "opt/edge/venv"


def run_install(*args: str, check: bool = True, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not OURS.match(k)}
    proc = subprocess.run(
        ["bash", str(INSTALL), "--python", sys.executable, *args],
        env={**base, **env}, capture_output=True, text=True, timeout=600, check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"install.sh {args} exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def fast_install(destdir: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return run_install("--destdir", str(destdir), "--no-nemo", "--no-model", *args,
                       EDGE_INSTALL_PIP_ARGS="--no-deps", **env)


def steps(out: str) -> list[tuple[str, str]]:
    return [(line[:8].strip(), line[9:]) for line in out.splitlines() if not line.startswith("done")]


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under root (venv contents aside) with its size and mtime."""
    return {
        str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns)
        for p in root.rglob("*") if VENV + "/" not in str(p.relative_to(root)) + "/"
    }


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    destdir = tmp_path_factory.mktemp("root")
    return destdir, run_install("--destdir", str(destdir), "--no-nemo", "--no-model").stdout


# --- shell hygiene and usage ---

def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout


def shell_scripts() -> list[Path]:
    """Every shell script of the project: *.sh, and files whose shebang names sh or bash."""
    found = []
    for name in _git("ls-files", "--cached", "--others", "--exclude-standard").splitlines():
        path = ROOT / name
        if not path.is_file():
            continue
        shebang = path.read_bytes()[:64].split(b"\n")[0] if path.suffix == "" else b""
        if path.suffix in (".sh", ".bash") or re.match(rb"#!.*\b(ba)?sh\b", shebang):
            found.append(path)
    return sorted(found)


def test_every_shell_script_passes_shellcheck() -> None:
    scripts = shell_scripts()
    names = {str(p.relative_to(ROOT)) for p in scripts}
    assert {"install.sh", "scripts/test.sh", "scripts/apt.sh", ".ci/run"} <= names
    proc = subprocess.run(["shellcheck", "-x", *map(str, scripts)], cwd=ROOT,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_install_prints_help_and_exits_2_on_an_unknown_option() -> None:
    help_ = run_install("--help")
    assert help_.stdout.startswith("Usage: sudo ./install.sh") and "--destdir DIR" in help_.stdout
    bad = run_install("--frobnicate", check=False)
    assert bad.returncode == 2 and "unknown option --frobnicate" in bad.stderr


# --- dry run, layout, second run ---

def _source_tree() -> str:
    # Ignored files too (build/, *.egg-info a pip build would leave); .venv stays one line.
    return _git("status", "--porcelain", "--ignored")


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    destdir = tmp_path / "root"
    before = _source_tree()
    proc = run_install("--dry-run", "--destdir", str(destdir), "--no-nemo")
    assert not destdir.exists() and _source_tree() == before
    said = dict(steps(proc.stdout))
    assert said["venv"].startswith("would create /opt/edge/venv and install edge")
    assert ("config", "would write /etc/edge/edge.env") in steps(proc.stdout)
    assert ("unit", "would write /etc/systemd/system/edge.service") in steps(proc.stdout)
    assert proc.stdout.endswith("done: dry run, nothing written\n")


def test_destdir_install_lays_out_venv_unit_env_and_user(installed: tuple[Path, str]) -> None:
    root, out = installed
    assert out.endswith("done: installed\n")
    python = root / VENV / "bin/python"
    version = subprocess.run([python, "-m", "edge", "--version"], capture_output=True, text=True)
    assert version.stdout.strip() == "edge 0.1.0"
    # The venv names the path it will have on the device, not the destdir.
    assert (root / VENV / "bin/edge").read_text().splitlines()[0] == "#!/opt/edge/venv/bin/python"
    assert str(root) not in (root / VENV / "pyvenv.cfg").read_text()
    assert (root / UNIT).read_text() == (ROOT / "systemd/edge.service").read_text()
    assert (root / "opt/edge/README.md").is_file()  # the unit's Documentation=
    assert (root / DROPINS / "memory.conf").read_text().splitlines()[-2:] == [
        "MemoryHigh=2573M", "MemoryMax=3216M",
    ]
    assert not (root / DROPINS / "cache.conf").exists()  # the cache is the unit's own
    env = root / ENV_FILE
    assert "\nNEMO_CACHE_DIR=/var/cache/edge\n" in env.read_text()
    assert env.stat().st_mode & 0o777 == 0o640
    assert "u edge - " in (root / SYSUSERS).read_text()
    link = root / "etc/systemd/system/multi-user.target.wants/edge.service"
    assert os.readlink(link) == "../edge.service"
    assert (root / "var/cache/edge").is_dir() and (root / "var/lib/edge").is_dir()


def test_the_installed_venv_runs_edge_check(installed: tuple[Path, str], tmp_path: Path) -> None:
    root, _ = installed
    env = {k: v for k, v in os.environ.items() if not OURS.match(k)}
    env.update(EDGE_ENV_FILE=str(root / ENV_FILE), EDGE_STT_API="none", EDGE_PORT="0")
    proc = subprocess.run([root / VENV / "bin/python", "-m", "edge", "check"], env=env,
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode in (0, 1), proc.stderr
    assert re.search(r"^ok    packages  required packages present$", proc.stdout, re.M)
    if shutil.which("pkg-config") and subprocess.run(
        ["pkg-config", "--exists", "libsystemd"], check=False
    ).returncode == 0:  # where libsystemd is there to build it, sd_notify is in the venv
        subprocess.run([root / VENV / "bin/python", "-c", "import systemd.daemon"], check=True)


def test_second_run_changes_nothing(installed: tuple[Path, str]) -> None:
    root, _ = installed
    before = tree(root)
    proc = run_install("--destdir", str(root), "--no-nemo", "--no-model")
    said = steps(proc.stdout)
    assert proc.stdout.endswith("done: nothing changed\n")
    acting = [(s, m) for s, m in said if s not in ("platform", "cache")]
    assert acting and all(m.startswith(("unchanged", "skipped")) for _, m in acting), said
    assert tree(root) == before


def test_existing_env_file_is_kept_and_drives_the_unit(tmp_path: Path) -> None:
    env = tmp_path / ENV_FILE
    env.parent.mkdir(parents=True)
    mine = "NEMO_CACHE_DIR=/srv/models\nEDGE_DIARIZATION_MEMORY_MB=4096\nEDGE_API_KEYS=k\n"
    env.write_text(mine)
    proc = fast_install(tmp_path, "--cache-dir", "/mnt/elsewhere")
    assert env.read_text() == mine
    assert ("config", "unchanged /etc/edge/edge.env (an existing env file is never overwritten)") in (
        steps(proc.stdout))
    assert "already sets NEMO_CACHE_DIR=/srv/models" in proc.stdout
    assert (tmp_path / DROPINS / "cache.conf").read_text().endswith("\nReadWritePaths=/srv/models\n")
    assert "MemoryHigh=4826M" in (tmp_path / DROPINS / "memory.conf").read_text()
    assert (tmp_path / "srv/models").is_dir()


def test_uninstall_keeps_config_and_cache(tmp_path: Path) -> None:
    fast_install(tmp_path)
    model = tmp_path / "var/cache/edge/diar_streaming_sortformer_4spk-v2.1.nemo"
    model.write_bytes(b"weights")
    proc = run_install("--destdir", str(tmp_path), "--uninstall")
    for gone in (UNIT, DROPINS, SYSUSERS, "opt/edge",
                 "etc/systemd/system/multi-user.target.wants/edge.service"):
        assert not (tmp_path / gone).exists(), gone
    assert (tmp_path / ENV_FILE).is_file() and model.read_bytes() == b"weights"
    assert (tmp_path / "var/lib/edge").is_dir()
    assert proc.stdout.endswith("done: uninstalled\n")
    again = run_install("--destdir", str(tmp_path), "--uninstall")
    assert again.stdout.endswith("done: nothing changed\n")


# --- free space and the cache dir from simulated machines ---

def test_low_disk_is_a_clear_error(tmp_path: Path) -> None:
    df = tmp_path / "df.txt"
    df.write_text("Mounted on Avail\n/ 104857600\n")  # 100 MB everywhere
    destdir = tmp_path / "root"
    proc = run_install("--destdir", str(destdir), "--no-nemo", check=False, EDGE_INSTALL_DF=str(df))
    assert proc.returncode == 3
    assert proc.stderr == (f"install.sh: not enough free space for the venv at {destdir}/opt/edge: "
                           "100 MB free, 512 MB needed\n")
    assert not destdir.exists()
    # The threshold alone, on the real disk.
    proc = run_install("--destdir", str(destdir), check=False,
                       EDGE_INSTALL_NEED_VENV_MB=str(1 << 40))
    assert proc.returncode == 3 and "not enough free space for the venv" in proc.stderr


@pytest.mark.parametrize(("nvme_free_mb", "cache"), [
    (200_000, "/mnt/nvme/edge-cache (nvme nvme0n1, 200000 MB free; NVMe mount /mnt/nvme)"),
    (None, "/var/cache/edge (sd mmcblk1, 20000 MB free; no NVMe mount)"),
    (300, "/var/cache/edge (sd mmcblk1, 20000 MB free; NVMe /mnt/nvme has 300 MB free, "
          "1024 MB needed)"),
], ids=["nvme-present", "sd-only", "nvme-full"])
def test_install_picks_the_cache_dir_from_the_mount_tables(
    tmp_path: Path, nvme_free_mb: int | None, cache: str
) -> None:
    machine = sd_card_jetson(tmp_path / "machine", nvme_free_mb=nvme_free_mb)
    env = {"EDGE_INSTALL_PROBE_ROOT": str(machine.root), "EDGE_INSTALL_DF": str(machine.df_path)}
    destdir = tmp_path / "root"
    proc = fast_install(destdir, **env)
    said = dict(steps(proc.stdout))
    assert said["platform"].startswith("jetson: NVIDIA Jetson Orin Nano Developer Kit, JetPack 6.1")
    assert said["cache"] == cache
    cache_dir = cache.split()[0]
    assert f"\nNEMO_CACHE_DIR={cache_dir}\n" in (destdir / ENV_FILE).read_text()
    dropin = destdir / DROPINS / "cache.conf"
    if nvme_free_mb == 200_000:
        assert dropin.read_text().endswith(f"\nReadWritePaths={cache_dir}\n")
    else:
        assert not dropin.exists()
        assert "warning: model cache /var/cache/edge is on the sd card" in proc.stdout


# --- the unit ---

def _analyze(*args: str | Path) -> subprocess.CompletedProcess[str]:
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed (scripts/test.sh installs it)")
    return subprocess.run(["systemd-analyze", *map(str, args)], capture_output=True, text=True,
                          check=False, timeout=120)


@pytest.fixture(scope="module")
def nvme_install(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An install whose cache is on an NVMe mount, so the unit gets both drop-ins."""
    tmp = tmp_path_factory.mktemp("nvme")
    machine = sd_card_jetson(tmp / "machine", nvme_free_mb=200_000)
    fast_install(tmp / "root", EDGE_INSTALL_PROBE_ROOT=str(machine.root),
                 EDGE_INSTALL_DF=str(machine.df_path))
    return tmp / "root"


def test_the_installed_unit_passes_systemd_analyze_verify_silently(
    nvme_install: Path, tmp_path: Path,
) -> None:
    # verify wants ExecStart's binary on this machine: point it at the destdir's venv.
    check = tmp_path / "verify"
    shutil.copytree(nvme_install / DROPINS, check / "edge.service.d")
    unit = (nvme_install / UNIT).read_text()
    assert "\nExecStart=/opt/edge/venv/bin/edge serve\n" in unit
    (check / "edge.service").write_text(unit.replace("=/opt/edge/", f"={nvme_install}/opt/edge/"))
    proc = _analyze("verify", check / "edge.service")
    # Drop-in mistakes are only printed, so silence is the bar, not just the exit code.
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")


def test_the_units_security_exposure_is_at_most_2_5(nvme_install: Path) -> None:
    proc = _analyze("security", "--offline=yes", "--threshold=25", f"--root={nvme_install}",
                    "edge.service")
    m = re.search(r"Overall exposure level for edge\.service: (\d+\.\d)", proc.stdout)
    assert m, proc.stdout + proc.stderr
    assert proc.returncode == 0 and float(m.group(1)) <= 2.5, m.group(0)


# Directives the unit and install.sh's drop-ins use, with the systemd release that added each
# (systemd's NEWS; the man pages of 249). JetPack 6 (Ubuntu 22.04) ships systemd 249: a
# directive missing here must be looked up and added, or left out of the unit.
SINCE = {
    "Description": 1, "Documentation": 1, "Wants": 1, "After": 1, "WantedBy": 1,
    "StartLimitIntervalSec": 229, "StartLimitBurst": 229, "Type": 1, "NotifyAccess": 1,
    "ExecStart": 1, "User": 1, "Group": 1, "SupplementaryGroups": 1, "EnvironmentFile": 1,
    "Environment": 1, "TimeoutStartSec": 188, "TimeoutStopSec": 188, "WatchdogSec": 1,
    "Restart": 1, "RestartSec": 1, "RestartPreventExitStatus": 189, "KillMode": 1, "OOMPolicy": 243,
    "LimitNOFILE": 1,
    "MemoryHigh": 231, "MemoryMax": 231,
    "CacheDirectory": 235, "CacheDirectoryMode": 235, "StateDirectory": 235,
    "StateDirectoryMode": 235, "ProtectSystem": 214, "ProtectHome": 214, "PrivateTmp": 1,
    "PrivateMounts": 239, "PrivateDevices": 209, "DevicePolicy": 208, "DeviceAllow": 208,
    "NoNewPrivileges": 187, "CapabilityBoundingSet": 1, "AmbientCapabilities": 229,
    "ProtectKernelTunables": 232, "ProtectKernelModules": 232, "ProtectKernelLogs": 244,
    "ProtectControlGroups": 232, "ProtectClock": 245, "ProtectHostname": 242,
    "ProtectProc": 247, "RestrictAddressFamilies": 211, "RestrictNamespaces": 233,
    "RestrictRealtime": 231, "RestrictSUIDSGID": 242, "LockPersonality": 235,
    "SystemCallArchitectures": 209, "SystemCallFilter": 187, "SystemCallErrorNumber": 209,
    "UMask": 1, "RemoveIPC": 232, "KeyringMode": 235, "ReadWritePaths": 231,
}


def test_unit_survives_a_worker_oom_kill_and_has_fds_for_a_flood() -> None:
    """Issue 14 items 3 and 4: a kernel OOM kill (of the worker) must not stop the unit, and the
    fd limit must be far above the default soft 1024."""
    unit = (ROOT / "systemd/edge.service").read_text()
    assert re.search(r"^OOMPolicy=continue$", unit, re.M)
    m = re.search(r"^LimitNOFILE=(\d+)$", unit, re.M)
    assert m and int(m.group(1)) >= 16384


def test_the_unit_uses_only_directives_systemd_249_knows(nvme_install: Path) -> None:
    files = [nvme_install / UNIT, *sorted((nvme_install / DROPINS).glob("*.conf"))]
    assert len(files) == 3
    used = {m.group(1) for f in files for m in re.finditer(r"^(\w+)=", f.read_text(), re.M)}
    unknown = used - set(SINCE)
    assert not unknown, f"look up these directives' systemd release: {sorted(unknown)}"
    assert {d: SINCE[d] for d in used if SINCE[d] > 249} == {}


def test_sysusers_file_creates_the_service_user(installed: tuple[Path, str], tmp_path: Path) -> None:
    if not shutil.which("systemd-sysusers"):
        pytest.skip("systemd-sysusers is not installed")
    image = tmp_path / "image"
    shutil.copytree(installed[0] / "usr", image / "usr")
    (image / "etc").mkdir()
    subprocess.run(["systemd-sysusers", f"--root={image}"], check=True, capture_output=True)
    passwd = (image / "etc/passwd").read_text()
    assert re.search(r"^edge:x:\d+:\d+:edge speech appliance:/var/lib/edge:\S*nologin$", passwd, re.M)
    groups = (image / "etc/group").read_text()
    assert re.search(r"^video:x:\d+:edge$", groups, re.M)
    assert re.search(r"^render:x:\d+:edge$", groups, re.M)


# --- issue 14 items 5, 17, 18, 19; issue 11 item 4 ---

def _lib(call: str) -> str:
    proc = subprocess.run(["bash", "-c", f'. "{ROOT}/scripts/install-lib.sh"; {call}'],
                          capture_output=True, text=True, check=True)
    return proc.stdout.strip()


@pytest.mark.skipif(os.geteuid() != 0, reason="making directories another user owns needs root")
def test_pips_temporary_parent_is_one_only_root_can_change(tmp_path: Path) -> None:
    """Never inside the service user's cache, nor under a directory it (or anyone) can change."""
    mount = tmp_path / "nvme"
    cache = mount / "models" / "edge-cache"  # the operator's dir, then the cache edge owns
    cache.mkdir(parents=True)
    mount.chmod(0o755)
    (mount / "models").chmod(0o755)
    os.chown(cache, 65534, 65534)
    assert _lib(f"safe_tmp_parent {cache}") == str(mount / "models")
    planted = cache / "root-owned"  # root's, but in a directory edge can rename it out of
    planted.mkdir()
    assert _lib(f"safe_tmp_parent {planted}") == str(mount / "models")
    (mount / "models").chmod(0o775)  # group-writable: not root's alone
    assert _lib(f"safe_tmp_parent {cache}") == str(mount)


def test_an_existing_cache_dir_gets_a_dedicated_subdirectory(tmp_path: Path) -> None:
    models = tmp_path / "srv/models"
    models.mkdir(parents=True)
    models.chmod(0o755)
    (models / "theirs.bin").write_bytes(b"x")
    proc = fast_install(tmp_path, "--cache-dir", "/srv/models")
    said = dict(steps(proc.stdout))
    assert said["cache"].startswith("/srv/models/edge-cache (") and "/srv/models exists" in said["cache"]
    assert "\nNEMO_CACHE_DIR=/srv/models/edge-cache\n" in (tmp_path / ENV_FILE).read_text()
    assert (tmp_path / DROPINS / "cache.conf").read_text().endswith(
        "\nReadWritePaths=/srv/models/edge-cache\n")
    assert models.stat().st_mode & 0o7777 == 0o755 and (models / "theirs.bin").read_bytes() == b"x"
    assert (models / "edge-cache").stat().st_mode & 0o777 == 0o750
    # A directory that does not exist yet is made the cache itself.
    other = tmp_path / "other"
    fast_install(other, "--cache-dir", "/srv/fresh")
    assert "\nNEMO_CACHE_DIR=/srv/fresh\n" in (other / ENV_FILE).read_text()


@pytest.mark.skipif(not Path("/usr/bin/python3").is_file(), reason="no /usr/bin/python3")
def test_a_venv_made_from_another_interpreter_is_rebuilt(tmp_path: Path) -> None:
    """First from this test's interpreter (a pyenv one here), then --python /usr/bin/python3:
    the venv is made again from it, not reused with the old interpreter inside."""
    system = os.path.realpath("/usr/bin/python3")
    code = "import os, sys; print(os.path.realpath(sys._base_executable))"
    ours = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip()
    if ours == system:
        pytest.skip("this interpreter is /usr/bin/python3 itself")
    if subprocess.run(["/usr/bin/python3", "-c", "import ensurepip, venv"], check=False).returncode:
        pytest.skip("/usr/bin/python3 has no venv/ensurepip")
    fast_install(tmp_path)
    proc = fast_install(tmp_path, "--python", "/usr/bin/python3")
    assert f"venv     rebuilding /opt/edge/venv: made from {ours}, not {system}\n" in proc.stdout
    cfg = (tmp_path / VENV / "pyvenv.cfg").read_text()
    assert "\nhome = /usr/bin\n" in "\n" + cfg


def fake_torch_wheel(folder: Path, version: str = "0.0.1+cpu") -> Path:
    """A wheel named torch (a stand-in for PyTorch's 200 MB one): `torch.__version__` and
    `torch.version.cuda`, which is all install.sh reads from it. Version 0.0.1, asked for by
    EDGE_TORCH_SPEC, so that no real torch this machine's pip can see is taken instead."""
    import base64
    import hashlib
    import zipfile

    folder.mkdir(parents=True, exist_ok=True)
    public = version.split("+")[0]
    dist = f"torch-{public}.dist-info"
    files = {
        "torch/__init__.py": f"__version__ = {version!r}\nfrom torch import version\n",
        "torch/version.py": "cuda = None\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: torch\nVersion: {public}\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }

    def digest(text: str) -> str:
        return base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()

    record = [f"{name},sha256={digest(text)},{len(text.encode())}" for name, text in files.items()]
    files[f"{dist}/RECORD"] = "\n".join([*record, f"{dist}/RECORD,,"]) + "\n"
    path = folder / f"torch-{public}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return path


def test_an_unreachable_torch_index_fails_fast_and_wheels_or_the_default_index_stand_in(
    tmp_path: Path,
) -> None:
    import time

    dead = {"EDGE_TORCH_INDEX": "http://127.0.0.1:9/simple", "EDGE_INSTALL_NEED_VENV_MB": "0",
            "EDGE_TORCH_SPEC": "torch==0.0.1"}
    t0 = time.monotonic()
    proc = run_install("--destdir", str(tmp_path / "a"), "--no-model", check=False,
                       EDGE_INSTALL_PIP_ARGS="--no-deps", **dead)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr.startswith("install.sh: the torch index http://127.0.0.1:9/simple did not "
                                  "answer in 5 s: use --wheels DIR"), proc.stderr
    assert time.monotonic() - t0 < 120  # pip's retries on a dead index take minutes
    wheels = tmp_path / "wheels"
    fake_torch_wheel(wheels)
    ok = run_install("--destdir", str(tmp_path / "b"), "--no-model", "--wheels", str(wheels),
                     EDGE_INSTALL_PIP_ARGS="--no-deps", **dead)
    said = steps(ok.stdout)
    assert ("venv", f"installing torch==0.0.1 from {wheels}") in said
    assert ("venv", "torch 0.0.1+cpu (CPU build)") in said
    assert (tmp_path / "b/opt/edge/constraints.txt").read_text() == "torch==0.0.1\n"
    # Asked for: pip's default index (here a local one) instead, with a warning about its size.
    asked = run_install("--destdir", str(tmp_path / "c"), "--no-model", "--torch-default-index",
                        EDGE_INSTALL_PIP_ARGS=f"--no-deps --find-links {wheels}", **dead)
    said = steps(asked.stdout)
    assert any(s == "venv" and "warning: http://127.0.0.1:9/simple did not answer" in m
               and "~4 GB" in m for s, m in said), said
    assert ("venv", "installing torch==0.0.1") in said and ("venv", "torch 0.0.1+cpu (CPU build)") in said


def fake_export(folder: Path) -> Path:
    """A folder shaped like `edge model export --out DIR`'s: files, then the marker listing them."""
    import hashlib
    import json

    folder.mkdir(parents=True)
    files = {"model.onnx": b"onnx" * 1000, "model.int8.onnx": b"int8" * 300, "features.npz": b"npz"}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    listed = {n: {"size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in files.items()}
    marker = {"source_sha256": "a" * 64, "source_name": "m.nemo", "files": listed}
    (folder / "edge-export.json").write_text(json.dumps(marker))
    return folder


def test_a_pre_exported_model_is_installed_for_an_onnx_only_worker(tmp_path: Path) -> None:
    export = fake_export(tmp_path / "build" / "diar_streaming_sortformer_4spk-v2.1-0123456789ab")
    root = tmp_path / "root"
    proc = fast_install(root, "--exported", str(export))
    said = steps(proc.stdout)
    target = "/var/cache/edge/exported/" + export.name
    assert ("model", f"installed {export} as {target}") in said
    assert any(s == "venv" and m.startswith("installing edge[onnx") for s, m in said), said
    for name in ("model.onnx", "model.int8.onnx", "features.npz", "edge-export.json"):
        assert (root / target.lstrip("/") / name).read_bytes() == (export / name).read_bytes()
    again = fast_install(root, "--exported", str(export))
    assert ("model", f"unchanged {target}") in steps(again.stdout)
    (export / "model.onnx").write_bytes(b"tampered")
    bad = run_install("--destdir", str(tmp_path / "r2"), "--no-nemo", "--no-model", "--exported",
                      str(export), check=False, EDGE_INSTALL_PIP_ARGS="--no-deps")
    assert bad.returncode == 1
    assert "model.onnx: size or SHA-256 differs from edge-export.json" in bad.stderr
    missing = run_install("--destdir", str(tmp_path / "r3"), "--exported", str(tmp_path), check=False)
    assert missing.returncode == 2 and "no edge-export.json in it" in missing.stderr
