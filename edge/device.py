"""What this machine is: platform, the storage under a directory, free space, the cache dir.

Standard library only, on purpose: `install.sh` runs this module with the system Python from the
source tree (`python3 -m edge.provision`) before the venv exists, so the cache-dir choice it makes
and the one `edge check` reports come from the same code. Every function takes the file-system
root it reads (`/proc`, `/sys`, `/etc` under it) and, where it measures, the free-space function,
so tests drive it from simulated mount tables and sysfs trees.
"""

from __future__ import annotations

import os
import platform as _platform
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path("/")
DEFAULT_CACHE_DIR = Path("/var/cache/edge")  # the unit's CacheDirectory=edge
NVME_CACHE_NAME = "edge-cache"  # created at the top of a chosen NVMe mount
MODEL_SPACE_MB = 1024  # the Sortformer .nemo (~470 MB) plus a download's temporary copy
DAEMON_MEMORY_MB = 200  # the daemon itself, besides the diarizer worker's budget
# The decoder process (edge/decode_process.py): 70 MB, plus ~2 MB of FFmpeg state per
# compressed stream (docs/notes/pyav-decode.md), for EDGE_MAX_SESSIONS' default 16 and slack.
DECODER_MEMORY_MB = 120
DEFAULT_DIARIZATION_MEMORY_MB = 2048  # Settings.edge_diarization_memory_mb's default
MB = 1024 * 1024

FreeSpace = Callable[[Path], int]

# L4T release -> JetPack, most specific first (NVIDIA's JetPack archive); majors as fallback.
_JETPACK = {
    "36.4.4": "6.2.1", "36.4.3": "6.2", "36.4": "6.1", "36.3": "6.0", "36.2": "6.0 DP",
    "35.6": "5.1.4", "35.5": "5.1.3", "35.4": "5.1.2", "35.3": "5.1.1", "35.2": "5.1",
    "35.1": "5.0.2", "38.2": "7.0",
}
_JETPACK_MAJOR = {"32": "4", "35": "5", "36": "6", "38": "7"}


@dataclass(frozen=True)
class Platform:
    """`kind` is "jetson", "x86_64", "aarch64" or another `uname -m`."""

    kind: str
    machine: str
    model: str | None = None
    l4t: str | None = None
    jetpack: str | None = None

    def describe(self) -> str:
        if self.kind != "jetson":
            return f"{self.kind}" + (f" ({self.model})" if self.model else "")
        release = f"JetPack {self.jetpack or '?'} (L4T {self.l4t or '?'})"
        return f"jetson: {self.model or 'unknown model'}, {release}"


def detect_platform(root: Path = ROOT, machine: str | None = None) -> Platform:
    """A Jetson is recognised by /etc/nv_tegra_release or a device-tree model naming one."""
    machine = machine or _platform.machine()
    model = _read(root / "proc/device-tree/model")
    model = model.rstrip("\0").strip() if model else None
    release = _read(root / "etc/nv_tegra_release")
    if release is None and not (model and "jetson" in model.lower()):
        kind = machine if machine in ("x86_64", "aarch64") else machine or "unknown"
        return Platform(kind=kind, machine=machine, model=model)
    l4t = _l4t_version(release) if release else None
    return Platform("jetson", machine, model, l4t, jetpack_for(l4t) if l4t else None)


def _l4t_version(release: str) -> str | None:
    # "# R36 (release), REVISION: 4.0, GCID: ..." -> "36.4.0"
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", release)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def jetpack_for(l4t: str) -> str | None:
    """The JetPack release of an L4T version ("36.4.0" -> "6.1"), "6.x" when unlisted."""
    parts = l4t.split(".")
    for n in (3, 2):
        if ".".join(parts[:n]) in _JETPACK:
            return _JETPACK[".".join(parts[:n])]
    major = _JETPACK_MAJOR.get(parts[0])
    return f"{major}.x" if major else None


# --- mounts and the storage under a path ---

@dataclass(frozen=True)
class Mount:
    devno: str  # "major:minor" from mountinfo: resolves /dev/root too, unlike the source
    target: Path
    fstype: str
    source: str
    options: frozenset[str]
    bind_root: str  # "/" unless this is a bind mount of a subtree


@dataclass(frozen=True)
class Storage:
    """`kind`: "nvme", "sd" (SD card), "emmc", "disk" (SATA, USB, virtio), "virtual" (tmpfs,
    overlay, network: no block device of ours), "unknown"."""

    kind: str
    device: str | None
    mount: Path
    fstype: str

    @property
    def is_flash_card(self) -> bool:
        return self.kind in ("sd", "emmc")


def read_mounts(root: Path = ROOT) -> list[Mount]:
    text = _read(root / "proc/self/mountinfo") or ""
    mounts = []
    for line in text.splitlines():
        pre, sep, post = line.partition(" - ")
        fields, tail = pre.split(), post.split()
        if not sep or len(fields) < 6 or len(tail) < 2:
            continue
        mounts.append(Mount(
            devno=fields[2], target=Path(_unescape(fields[4])), fstype=tail[0],
            source=_unescape(tail[1]), options=frozenset(fields[5].split(",")),
            bind_root=_unescape(fields[3]),
        ))
    return mounts


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as octal escapes (\040 ...).
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_of(path: Path, mounts: Iterable[Mount]) -> Mount | None:
    """The mount a path lives on: the last-mounted longest target prefix of it."""
    best: Mount | None = None
    for m in mounts:  # later mounts cover earlier ones on the same target: >= keeps the last
        covers = path == m.target or m.target in path.parents
        if covers and (best is None or len(m.target.parts) >= len(best.target.parts)):
            best = m
    return best


def storage_of(path: Path, root: Path = ROOT, mounts: list[Mount] | None = None) -> Storage:
    """Which kind of storage holds `path` (it need not exist yet)."""
    path = Path(os.path.abspath(path))
    mount = mount_of(path, read_mounts(root) if mounts is None else mounts)
    if mount is None:
        return Storage("unknown", None, Path("/"), "?")
    if mount.devno.startswith("0:"):  # anonymous device: tmpfs, overlay, nfs, ...
        return Storage("virtual", None, mount.target, mount.fstype)
    name = _block_name(root, mount)
    disk = _disk_of(root, name) if name else None
    return Storage(_classify(root, disk), disk, mount.target, mount.fstype)


def _block_name(root: Path, mount: Mount) -> str | None:
    link = root / "sys/dev/block" / mount.devno
    try:
        return Path(os.readlink(link)).name
    except OSError:
        src = mount.source
        return src.removeprefix("/dev/") if src.startswith("/dev/") and src != "/dev/root" else None


def _disk_of(root: Path, name: str) -> str:
    """The whole disk of a partition or device-mapper volume (nvme0n1p1 -> nvme0n1)."""
    if name.startswith("dm-"):
        slaves = sorted(p.name for p in (root / "sys/block" / name / "slaves").glob("*"))
        return _disk_of(root, slaves[0]) if slaves else name
    for pattern in (r"(nvme\d+n\d+)p\d+", r"(mmcblk\d+)p\d+", r"([shvx]v?d[a-z]+)\d+"):
        m = re.fullmatch(pattern, name)
        if m:
            return m.group(1)
    return name


def _classify(root: Path, disk: str | None) -> str:
    if disk is None:
        return "unknown"
    if disk.startswith("nvme"):
        return "nvme"
    if disk.startswith("mmcblk"):
        # The MMC core says "SD" or "MMC" (eMMC); an unknown card is treated as an SD card.
        kind = (_read(root / "sys/block" / disk / "device/type") or "SD").strip()
        return "emmc" if kind == "MMC" else "sd"
    if re.match(r"(sd|vd|xvd|hd)[a-z]", disk):
        return "disk"
    return "unknown"


# --- free space and the cache-dir choice ---

def free_bytes(path: Path) -> int:
    """Bytes an unprivileged user may still write where `path` is (or would be created)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def df_table(text: str) -> FreeSpace:
    """A free-space function from `df -B1 --output=target,avail` text: how tests and
    `EDGE_INSTALL_DF` simulate a disk. The longest listed target prefix of a path wins."""
    table: dict[Path, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            table[Path(parts[0])] = int(parts[1])

    def free(path: Path) -> int:
        path = Path(os.path.abspath(path))
        hits = [t for t in table if t == path or t in path.parents]
        if not hits:
            raise LookupError(f"{path}: not in the simulated df table")
        return table[max(hits, key=lambda t: len(t.parts))]

    return free


@dataclass(frozen=True)
class CacheChoice:
    path: Path
    storage: Storage
    free: int
    reason: str


# Mounts never considered for the cache: read-only media, boot and pseudo file systems.
_NOT_CACHE_FS = {"vfat", "iso9660", "squashfs", "tmpfs", "devtmpfs", "overlay", "ramfs"}
_NOT_CACHE_UNDER = tuple(Path(p) for p in ("/boot", "/proc", "/sys", "/dev", "/run", "/snap"))


def choose_cache_dir(
    need_bytes: int,
    *,
    root: Path = ROOT,
    free: FreeSpace = free_bytes,
    override: Path | None = None,
) -> CacheChoice:
    """Where the model cache goes: `override` if given; else /var/cache/edge when it is on
    NVMe with room; else the NVMe mount with the most room, if it has `need_bytes`; else
    /var/cache/edge on whatever holds it (the SD card, eMMC or a plain disk), saying why."""
    mounts = read_mounts(root)
    if override is not None:
        path = Path(os.path.abspath(override))
        return CacheChoice(path, storage_of(path, root, mounts), free(path), "chosen with --cache-dir")
    default = storage_of(DEFAULT_CACHE_DIR, root, mounts)
    default_free = free(DEFAULT_CACHE_DIR)
    if default.kind == "nvme" and default_free >= need_bytes:
        return CacheChoice(DEFAULT_CACHE_DIR, default, default_free, f"{default.mount} is on NVMe")
    best: tuple[int, Mount] | None = None
    for m in mounts:
        if not _cache_candidate(m) or m.target == default.mount:
            continue
        if storage_of(m.target, root, mounts).kind == "nvme":
            room = free(m.target)
            if best is None or room > best[0]:
                best = (room, m)
    if best is not None and best[0] >= need_bytes:
        room, m = best
        storage = storage_of(m.target, root, mounts)
        return CacheChoice(m.target / NVME_CACHE_NAME, storage, room, f"NVMe mount {m.target}")
    if best is not None:
        why = f"NVMe {best[1].target} has {best[0] // MB} MB free, {need_bytes // MB} MB needed"
    elif default.kind == "nvme":
        why = f"NVMe {default.mount} has {default_free // MB} MB free, {need_bytes // MB} MB needed"
    else:
        why = "no NVMe mount"
    return CacheChoice(DEFAULT_CACHE_DIR, default, default_free, why)


def _cache_candidate(m: Mount) -> bool:
    return (
        m.fstype not in _NOT_CACHE_FS
        and "ro" not in m.options
        and m.bind_root == "/"
        and not any(m.target == p or p in m.target.parents for p in _NOT_CACHE_UNDER)
    )


def worker_rss_limit(budget_bytes: int) -> int:
    """The worker RSS (bytes) above which the supervisor kills it, cause "memory": its budget
    (`EDGE_DIARIZATION_MEMORY_MB`) plus max(64 MB, 10 %)."""
    return budget_bytes + max(64 * MB, budget_bytes // 10)


def memory_limits(diarization_mb: int,
                  daemon_mb: int = DAEMON_MEMORY_MB + DECODER_MEMORY_MB) -> tuple[int, int]:
    """The unit's (MemoryHigh, MemoryMax) in MB. MemoryHigh is the supervisor's kill threshold
    for the worker (`worker_rss_limit`) plus the daemon and its decoder process: the kernel
    throttles only a worker the supervisor would kill anyway, never a daemon that is within
    bounds. A quarter above it the
    kernel OOM-kills, the worker first (oom_score_adj 1000), and with OOMPolicy=continue the
    unit lives on and the supervisor restarts the worker."""
    high = -(-worker_rss_limit(diarization_mb * MB) // MB) + daemon_mb
    return high, high + high // 4


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


__all__ = [
    "DEFAULT_CACHE_DIR",
    "MODEL_SPACE_MB",
    "CacheChoice",
    "Mount",
    "Platform",
    "Storage",
    "choose_cache_dir",
    "detect_platform",
    "df_table",
    "free_bytes",
    "jetpack_for",
    "memory_limits",
    "mount_of",
    "read_mounts",
    "storage_of",
    "worker_rss_limit",
]
