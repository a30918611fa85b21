"""edge/device.py against simulated machines (tests/fakes/machine.py): platform, storage kind,
the cache-dir choice and memory limits. `edge-provision` is in test_provision.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge import device
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
    assert device.memory_limits(2048) == (2573, 3216)
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
    assert high * device.MB >= kill_at + (device.DAEMON_MEMORY_MB + device.DECODER_MEMORY_MB) * device.MB
    assert high_max > high
