"""A simulated machine under a directory, in the formats the kernel and `df` use.

`proc/self/mountinfo` lines as the kernel writes them, `sys/dev/block/MAJ:MIN` links into a
device tree, `sys/block/mmcblkN/device/type` ("SD"/"MMC"), the Jetson release files, and a
`df -B1 --output=target,avail` table for the free space of each mount.
"""

from __future__ import annotations

import os
from pathlib import Path

from edge import device

MAJORS = {"nvme": 259, "mmcblk": 179, "sd": 8, "vd": 254, "dm-": 253}
RELEASE_36_4 = ("# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, "
                "EABI: aarch64, DATE: Fri Sep 13 04:36:44 UTC 2024\n")


class FakeMachine:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.df_path = root / "df.txt"
        self._lines: list[str] = []
        self._free: dict[str, int] = {}
        self._minor = 0
        (root / "proc/self").mkdir(parents=True, exist_ok=True)
        self._write()

    def mount(
        self,
        target: str,
        dev: str | None,
        *,
        fstype: str = "ext4",
        free_mb: int = 100_000,
        options: str = "rw,relatime",
        source: str | None = None,
        mmc_type: str | None = None,
        slaves: tuple[str, ...] = (),
    ) -> FakeMachine:
        """Mount `dev` ("nvme0n1p1", "mmcblk1p1", "dm-0"; None: a virtual fs) at `target`."""
        self._minor += 1
        if dev is None:
            devno = f"0:{40 + self._minor}"
        else:
            major = next(m for prefix, m in MAJORS.items() if dev.startswith(prefix))
            devno = f"{major}:{self._minor}"
            disk = device._disk_of(self.root, dev) if not dev.startswith("dm-") else dev
            parts = [disk, dev] if disk != dev else [dev]
            link = self.root / "sys/dev/block" / devno
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink("../../devices/platform/bus/" + "/".join(parts), link)
            if mmc_type:
                typ = self.root / "sys/block" / disk / "device/type"
                typ.parent.mkdir(parents=True, exist_ok=True)
                typ.write_text(mmc_type + "\n")
            for slave in slaves:
                (self.root / "sys/block" / dev / "slaves" / slave).mkdir(parents=True)
        src = source or (f"/dev/{dev}" if dev else fstype)
        escaped = target.replace(" ", "\\040")
        self._lines.append(
            f"{20 + self._minor} 1 {devno} / {escaped} {options} shared:{self._minor} "
            f"- {fstype} {src} rw"
        )
        self._free[target] = free_mb * device.MB
        self._write()
        return self

    def jetson(self, release: str | None = RELEASE_36_4,
               model: str = "NVIDIA Jetson Orin Nano Developer Kit") -> FakeMachine:
        if release is not None:
            (self.root / "etc").mkdir(exist_ok=True)
            (self.root / "etc/nv_tegra_release").write_text(release)
        tree = self.root / "proc/device-tree"
        tree.mkdir(parents=True, exist_ok=True)
        (tree / "model").write_text(model + "\0")
        return self

    def free(self) -> device.FreeSpace:
        return device.df_table(self.df_path.read_text())

    def _write(self) -> None:
        (self.root / "proc/self/mountinfo").write_text("".join(f"{line}\n" for line in self._lines))
        rows = [f"{target} {avail}" for target, avail in self._free.items()]
        self.df_path.write_text("Mounted on Avail\n" + "".join(f"{r}\n" for r in rows))


def sd_card_jetson(root: Path, *, nvme_free_mb: int | None = None) -> FakeMachine:
    """A Jetson booted from its SD card (root shows as /dev/root), with an NVMe mounted at
    /mnt/nvme when `nvme_free_mb` is given."""
    m = FakeMachine(root).jetson()
    m.mount("/", "mmcblk1p1", source="/dev/root", mmc_type="SD", free_mb=20_000)
    m.mount("/boot/efi", "mmcblk1p10", fstype="vfat", mmc_type="SD", free_mb=50)
    m.mount("/run", None, fstype="tmpfs", free_mb=700)
    if nvme_free_mb is not None:
        m.mount("/mnt/nvme", "nvme0n1p1", free_mb=nvme_free_mb)
    return m
