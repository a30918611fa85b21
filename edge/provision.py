"""Decisions `install.sh` asks Python for, before the venv exists: `python3 -m edge.provision`.

Standard library only (it runs with the system Python from the source tree). Bash does the
steps; this module decides, with the same code `edge check` uses (`edge.device`):

    probe   platform, cache dir (the env file's NEMO_CACHE_DIR, else --cache-dir, else the
            choice of `device.choose_cache_dir`), free space, memory limits; prints `key=value`
            lines, exits 3 with one line when there is not enough free space
    online  exits 0 when a URL answers within the timeout (prefetch the model or not)

Exit codes: 0 ok, 1 offline (`online`), 2 bad usage, 3 not enough free space.
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from edge import device

NO_SPACE = 3
# Room pip needs for the venv: what it ends up taking plus the wheels it unpacks on the way.
# A venv with torch (CPU) and NeMo's ASR extra measured 2.3 GB (`du -sh .venv`, x86_64).
VENV_SPACE_MB = {"none": 0, "base": 512, "nemo": 4096}


def read_env_file(path: Path) -> dict[str, str]:
    """`KEY=value` lines as systemd's EnvironmentFile= reads them (comments, blank lines and
    one level of matching quotes); an absent file is empty."""
    values: dict[str, str] = {}
    try:
        text = path.read_text()
    except OSError:
        return values
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")) or "=" not in line:
            continue
        key, value = (s.strip() for s in line.split("=", 1))
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.removeprefix("export ").strip()] = value
    return values


def probe(args: argparse.Namespace) -> tuple[list[tuple[str, str]], str | None]:
    """The `key=value` facts for install.sh, and an error line when space is short."""
    root = Path(args.root)
    free = device.df_table(Path(args.df).read_text()) if args.df else device.free_bytes
    env = read_env_file(Path(args.env_file)) if args.env_file else {}
    plat = device.detect_platform(root)
    out = [("platform", plat.kind), ("platform_desc", plat.describe()),
           ("jetpack", plat.jetpack or "")]
    warnings = []

    need_cache = args.need_cache_mb * device.MB
    configured = env.get("NEMO_CACHE_DIR")
    if configured:
        if args.cache_dir and Path(args.cache_dir) != Path(configured):
            warnings.append(f"the env file already sets NEMO_CACHE_DIR={configured} and is "
                            f"never overwritten: edit it to use {args.cache_dir}")
        choice = device.choose_cache_dir(need_cache, root=root, free=free, override=Path(configured))
        choice_source, reason = "env-file", "NEMO_CACHE_DIR in the env file"
    else:
        override = Path(args.cache_dir) if args.cache_dir else None
        subdir = (override is not None and args.cache_dir_exists
                  and override.name != device.NVME_CACHE_NAME)
        if subdir:
            # An existing directory is the operator's (an NVMe mount's root, a shared models
            # folder): the cache is a dedicated subdirectory, the only thing made edge's.
            override = override / device.NVME_CACHE_NAME  # type: ignore[operator]
        choice = device.choose_cache_dir(need_cache, root=root, free=free, override=override)
        choice_source, reason = ("option" if override else "auto"), choice.reason
        if subdir:
            reason = f"{args.cache_dir} exists: its subdirectory {device.NVME_CACHE_NAME}"
    if choice.storage.is_flash_card:
        warnings.append(f"model cache {choice.path} is on the {choice.storage.kind} card "
                        "(no NVMe with room): slower loads, more wear")
    # "managed": the unit's CacheDirectory= covers it; elsewhere it needs ReadWritePaths=.
    managed = "yes" if choice.path == device.DEFAULT_CACHE_DIR else "no"
    out += [("cache_dir", str(choice.path)), ("cache_managed", managed),
            ("cache_kind", choice.storage.kind),
            ("cache_device", choice.storage.device or ""),
            ("cache_free_mb", str(choice.free // device.MB)), ("cache_source", choice_source),
            ("cache_reason", reason)]

    budget = int(env.get("EDGE_DIARIZATION_MEMORY_MB") or device.DEFAULT_DIARIZATION_MEMORY_MB)
    high, high_max = device.memory_limits(budget)
    out += [("memory_budget_mb", str(budget)), ("memory_high", f"{high}M"),
            ("memory_max", f"{high_max}M")]
    out += [("warning", w) for w in warnings]

    error = None
    need_venv = VENV_SPACE_MB[args.venv] if args.need_venv_mb is None else args.need_venv_mb
    if need_venv and args.venv_dir:
        room = free(Path(args.venv_dir)) // device.MB
        if room < need_venv:
            error = (f"not enough free space for the venv at {args.venv_dir}: {room} MB free, "
                     f"{need_venv} MB needed")
    if error is None and args.check_cache_space and choice.free < need_cache:
        error = (f"not enough free space for the model cache at {choice.path}: "
                 f"{choice.free // device.MB} MB free, {args.need_cache_mb} MB needed "
                 "(free some space, choose another --cache-dir, or use --no-model)")
    return out, error


def online(url: str, timeout: float) -> bool:
    """True when `url` answers a HEAD request at all (any HTTP status) within `timeout`."""
    request = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True  # it answered
    except (OSError, ValueError):
        return False


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m edge.provision")
    sub = parser.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("probe", help="platform, cache dir, free space, memory limits")
    p.add_argument("--root", default="/", help="read /proc, /sys and /etc under this root")
    p.add_argument("--df", help="simulated `df -B1 --output=target,avail` output (tests)")
    p.add_argument("--env-file", help="the env file; its NEMO_CACHE_DIR wins")
    p.add_argument("--cache-dir", help="the operator's choice (--cache-dir of install.sh)")
    p.add_argument("--cache-dir-exists", action="store_true",
                   help="--cache-dir exists already: use a dedicated subdirectory of it")
    p.add_argument("--need-cache-mb", type=int, default=device.MODEL_SPACE_MB)
    p.add_argument("--check-cache-space", action="store_true", help="fail when the cache is short")
    p.add_argument("--venv-dir", help="where the venv goes")
    p.add_argument("--venv", choices=sorted(VENV_SPACE_MB), default="none",
                   help="what pip will install: none (venv unchanged), base, nemo")
    p.add_argument("--need-venv-mb", type=int, help="override the room the venv needs")
    o = sub.add_parser("online", help="exit 0 when URL answers")
    o.add_argument("url", nargs="?", default="https://huggingface.co")
    o.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args(argv)

    if args.verb == "online":
        return 0 if online(args.url, args.timeout) else 1
    facts, error = probe(args)
    if error:
        print(error, file=sys.stderr)
        return NO_SPACE
    for key, value in facts:
        print(f"{key}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
