"""edge/device.py and edge/provision.py against simulated machines (tests/fakes/machine.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from edge import device, provision
from edge.settings import Settings
from tests.fakes.machine import RELEASE_36_4, FakeMachine, sd_card_jetson

ROOT = Path(__file__).resolve().parent.parent
MB = device.MB


# --- platform ---

def test_a_jetson_is_described_from_its_release_file_and_device_tree(tmp_path: Path) -> None:
    FakeMachine(tmp_path).jetson()
    plat = device.detect_platform(tmp_path, machine="aarch64")
    assert (plat.kind, plat.l4t, plat.jetpack) == ("jetson", "36.4.0", "6.1")
    assert plat.model == "NVIDIA Jetson Orin Nano Developer Kit"  # NUL stripped
    assert plat.describe() == (
        "jetson: NVIDIA Jetson Orin Nano Developer Kit, JetPack 6.1 (L4T 36.4.0)"
    )


def test_a_jetson_without_a_release_file_is_found_from_its_device_tree(tmp_path: Path) -> None:
    # Containers often lack /etc/nv_tegra_release; the device tree still names the board.
    FakeMachine(tmp_path).jetson(release=None, model="NVIDIA Jetson AGX Orin Developer Kit")
    plat = device.detect_platform(tmp_path, machine="aarch64")
    assert plat.kind == "jetson" and plat.jetpack is None
    assert "JetPack ?" in plat.describe()


@pytest.mark.parametrize(("machine", "model", "kind"), [
    ("x86_64", None, "x86_64"),
    ("aarch64", "Raspberry Pi 5 Model B Rev 1.0", "aarch64"),
])
def test_other_boards_are_not_taken_for_a_jetson(
    tmp_path: Path, machine: str, model: str | None, kind: str,
) -> None:
    if model:
        (tmp_path / "proc/device-tree").mkdir(parents=True)
        (tmp_path / "proc/device-tree/model").write_text(model + "\0")
    plat = device.detect_platform(tmp_path, machine=machine)
    assert (plat.kind, plat.model) == (kind, model)


@pytest.mark.parametrize(("l4t", "jetpack"), [
    ("36.4.4", "6.2.1"), ("36.4.3", "6.2"), ("36.4.0", "6.1"), ("36.3.0", "6.0"),
    ("35.5.0", "5.1.3"), ("36.9.1", "6.x"), ("99.1", None),
])
def test_jetpack_version_is_looked_up_from_the_l4t_release(l4t: str, jetpack: str | None) -> None:
    assert device.jetpack_for(l4t) == jetpack


def test_release_line_is_parsed_as_nvidia_writes_it() -> None:
    assert device._l4t_version(RELEASE_36_4) == "36.4.0"


# --- storage kind ---

def test_storage_kind_is_found_through_the_root_device_mapper_and_escaped_mounts(tmp_path: Path) -> None:
    m = sd_card_jetson(tmp_path, nvme_free_mb=100_000)
    m.mount("/data", "mmcblk0p1", mmc_type="MMC")
    m.mount("/srv/lvm", "dm-0", slaves=("nvme1n1p3",))
    m.mount("/media/usb stick", "sda1")
    kinds = {
        p: (s.kind, s.device)
        for p in ("/var/cache/edge", "/mnt/nvme/x", "/data", "/srv/lvm/m", "/media/usb stick/a",
                  "/run/x")
        for s in [device.storage_of(Path(p), tmp_path)]
    }
    assert kinds == {
        "/var/cache/edge": ("sd", "mmcblk1"),  # /dev/root resolved through its MAJ:MIN
        "/mnt/nvme/x": ("nvme", "nvme0n1"),
        "/data": ("emmc", "mmcblk0"),
        "/srv/lvm/m": ("nvme", "nvme1n1"),  # device-mapper: the disk under it
        "/media/usb stick/a": ("disk", "sda"),  # \040 in mountinfo is a space
        "/run/x": ("virtual", None),
    }


def test_storage_without_sysfs_falls_back_to_the_source_name(tmp_path: Path) -> None:
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/mountinfo").write_text(
        "29 1 259:2 / /mnt/ssd rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw\n"
    )
    assert device.storage_of(Path("/mnt/ssd/a"), tmp_path).kind == "nvme"


def test_an_overmount_wins(tmp_path: Path) -> None:
    m = FakeMachine(tmp_path).mount("/", "vda1")
    m.mount("/mnt/nvme", "mmcblk1p1", mmc_type="SD").mount("/mnt/nvme", "nvme0n1p1")
    assert device.storage_of(Path("/mnt/nvme"), tmp_path).kind == "nvme"


# --- cache-dir choice: NVMe present / SD only / NVMe full ---

def test_cache_goes_to_nvme_when_one_has_room(tmp_path: Path) -> None:
    m = sd_card_jetson(tmp_path, nvme_free_mb=200_000)
    choice = device.choose_cache_dir(1024 * MB, root=tmp_path, free=m.free())
    assert choice.path == Path("/mnt/nvme/edge-cache")
    assert (choice.storage.kind, choice.free, choice.reason) == (
        "nvme", 200_000 * MB, "NVMe mount /mnt/nvme",
    )


def test_cache_stays_on_the_sd_card_without_nvme(tmp_path: Path) -> None:
    m = sd_card_jetson(tmp_path)
    choice = device.choose_cache_dir(1024 * MB, root=tmp_path, free=m.free())
    assert (choice.path, choice.storage.kind, choice.reason) == (
        device.DEFAULT_CACHE_DIR, "sd", "no NVMe mount",
    )
    assert choice.storage.is_flash_card


def test_a_full_nvme_is_passed_over(tmp_path: Path) -> None:
    m = sd_card_jetson(tmp_path, nvme_free_mb=300)
    choice = device.choose_cache_dir(1024 * MB, root=tmp_path, free=m.free())
    assert (choice.path, choice.storage.kind) == (device.DEFAULT_CACHE_DIR, "sd")
    assert choice.reason == "NVMe /mnt/nvme has 300 MB free, 1024 MB needed"


def test_root_on_nvme_keeps_the_unit_managed_cache(tmp_path: Path) -> None:
    m = FakeMachine(tmp_path).jetson().mount("/", "nvme0n1p1", free_mb=50_000)
    m.mount("/mnt/nvme2", "nvme1n1p1", free_mb=900_000)
    choice = device.choose_cache_dir(1024 * MB, root=tmp_path, free=m.free())
    assert (choice.path, choice.reason) == (device.DEFAULT_CACHE_DIR, "/ is on NVMe")


def test_the_nvme_with_most_room_wins_and_unusable_mounts_are_skipped(tmp_path: Path) -> None:
    m = sd_card_jetson(tmp_path, nvme_free_mb=5_000)
    m.mount("/mnt/big", "nvme1n1p1", free_mb=90_000)
    m.mount("/mnt/ro", "nvme2n1p1", free_mb=900_000, options="ro,relatime")
    m.mount("/boot/nvme", "nvme3n1p1", free_mb=900_000)
    m.mount("/mnt/efi", "nvme4n1p1", fstype="vfat", free_mb=900_000)
    choice = device.choose_cache_dir(1024 * MB, root=tmp_path, free=m.free())
    assert choice.path == Path("/mnt/big/edge-cache")


def test_override_is_taken_as_given(tmp_path: Path) -> None:
    m = sd_card_jetson(tmp_path, nvme_free_mb=200_000)
    choice = device.choose_cache_dir(
        1024 * MB, root=tmp_path, free=m.free(), override=Path("/srv/models")
    )
    assert (choice.path, choice.storage.kind, choice.reason) == (
        Path("/srv/models"), "sd", "chosen with --cache-dir",
    )


def test_free_bytes_measures_the_nearest_existing_parent(tmp_path: Path) -> None:
    assert device.free_bytes(tmp_path / "not/yet/there") == device.free_bytes(tmp_path)


def test_df_table_refuses_paths_it_does_not_list() -> None:
    free = device.df_table("Mounted on Avail\n/mnt/a 10\n")
    assert free(Path("/mnt/a/b")) == 10
    with pytest.raises(LookupError):
        free(Path("/elsewhere"))


# --- memory limits: the unit, its drop-in and the settings agree ---

def test_memory_limits_match_the_unit_and_the_settings_default() -> None:
    assert device.memory_limits(2048) == (2453, 3066)
    unit = (ROOT / "systemd/edge.service").read_text()
    high, high_max = device.memory_limits(device.DEFAULT_DIARIZATION_MEMORY_MB)
    assert f"\nMemoryHigh={high}M\n" in unit and f"\nMemoryMax={high_max}M\n" in unit
    default = Settings.model_fields["edge_diarization_memory_mb"].default
    assert default == device.DEFAULT_DIARIZATION_MEMORY_MB


@pytest.mark.parametrize("budget_mb", [256, 640, 2048, 4096, 65536])
def test_memory_high_is_above_the_supervisors_kill_threshold_plus_the_daemon(budget_mb: int) -> None:
    """The kernel must not throttle (MemoryHigh) or OOM-kill (MemoryMax) before the supervisor
    has killed a worker over its budget (issue 14, item 4)."""
    from edge.diarization.supervisor import WorkerSupervisor
    from edge.metrics import Metrics

    s = Settings(_env_file=None, edge_diarization_memory_mb=budget_mb)  # type: ignore[call-arg]
    kill_at = WorkerSupervisor(s, Metrics(), None).rss_limit  # type: ignore[arg-type]
    high, high_max = device.memory_limits(budget_mb)
    assert high * device.MB >= kill_at + device.DAEMON_MEMORY_MB * device.MB
    assert high_max > high


# --- provision: what install.sh reads ---

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
    assert (facts["memory_high"], facts["memory_max"]) == ("2453M", "3066M")


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
    assert (facts["memory_high"], facts["memory_max"]) == ("4706M", "5882M")
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
