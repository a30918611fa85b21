"""`edge check`: what an operator wants to know about a device, one line per check.

Each check returns a `Check` whose level is "ok", "warn" or "FAIL". FAIL is kept for what
stops the daemon from serving (a required package, the port taken by something else, the
unit failed, no room for the model, a model that does not match its pinned SHA-256); what
only degrades it (no NeMo, no Google credentials, the cache on the SD card) is a warning,
as on `/ready`. Everything the checks read from the machine is a parameter, for tests.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import socket
import ssl
import subprocess
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from edge import device
from edge.diarization import nemo_diarization_available, worker_runtime_available
from edge.diarization.digests import file_sha256
from edge.diarization.exports import export_status
from edge.diarization.model import ModelUnavailable, cached_model_path
from edge.diarization.runtime import plan_runtime
from edge.health import REQUIRED_PACKAGES, UPSTREAM_PACKAGES, missing_packages
from edge.plan import local_diarizer_used, plan_session
from edge.protocol import ListenParams
from edge.settings import Settings, load_settings

Level = Literal["ok", "warn", "FAIL"]
Systemctl = Callable[[Sequence[str]], str]
GoogleDefault = Callable[[], str]
UNIT = "edge.service"
GOOGLE_TIMEOUT_S = 5.0  # off Google Cloud, the credential lookup may wait on the metadata server


@dataclass(frozen=True)
class Check:
    name: str
    level: Level
    detail: str


def run_checks(
    settings: Settings,
    *,
    env_file: Path | None,
    environ: Mapping[str, str],
    daemon_url: str,
    root: Path = device.ROOT,
    free: device.FreeSpace = device.free_bytes,
    systemctl: Systemctl | None = None,
    google_default: GoogleDefault | None = None,
    deep: bool = False,
) -> list[Check]:
    """Every check, in the order an operator reads them. `environ` is the environment the
    daemon gets (the env file's values under the process's own); `daemon_url` its ws:// or
    wss:// address as `edge status` computes it."""
    systemd_runs = (root / "run/systemd/system").is_dir()
    model = find_model(settings)
    return [
        Check("platform", *_platform(root)),
        Check("config", "ok", f"env file {env_file or '(none: defaults and environment)'}"),
        Check("packages", *_packages(settings, systemd_runs)),
        Check("cache", *_cache(settings, root, free, model is not None)),
        Check("model", *_model(settings, model)),
        Check("export", *_export(settings, model)),
        Check("runtime", *_runtime(settings, model)),
        Check("nemo", *_nemo(settings, deep)),
        Check("google", *_google(settings, environ,
                                 google_default or (lambda: _google_default(settings=settings)))),
        Check("labels", *_labels(settings)),
        Check("port", *_port(settings, daemon_url)),
        Check("unit", *_unit(systemd_runs, systemctl or _systemctl)),
    ]


def failed(checks: Sequence[Check]) -> bool:
    return any(c.level == "FAIL" for c in checks)


def render(checks: Sequence[Check]) -> str:
    return "\n".join(f"{c.level:<4}  {c.name:<8}  {c.detail}" for c in checks)


def render_json(checks: Sequence[Check]) -> str:
    return json.dumps({"ok": not failed(checks), "checks": [asdict(c) for c in checks]})


def _platform(root: Path) -> tuple[Level, str]:
    plat = device.detect_platform(root)
    major = plat.jetpack.split(".")[0] if plat.jetpack else ""
    if plat.kind == "jetson" and major.isdigit() and int(major) < 6:
        return "warn", f"{plat.describe()}: edge targets JetPack 6 (Python 3.10, CUDA 12)"
    return "ok", plat.describe()


def _packages(settings: Settings, systemd_runs: bool) -> tuple[Level, str]:
    names = REQUIRED_PACKAGES + (UPSTREAM_PACKAGES if settings.edge_stt_api != "none" else ())
    missing = missing_packages(names)
    if missing:
        return "FAIL", "missing: " + ", ".join(missing)
    if systemd_runs and missing_packages(("systemd.daemon",)):
        return "FAIL", "systemd-python missing: under the unit READY=1 would never be sent"
    return "ok", "required packages present"


def _cache(
    settings: Settings, root: Path, free: device.FreeSpace, model_present: bool
) -> tuple[Level, str]:
    path = settings.nemo_cache_dir
    storage = device.storage_of(path, root)
    room = free(path) // device.MB
    where = f"{path} ({storage.kind}{' ' + storage.device if storage.device else ''}, {room} MB free)"
    if path.exists() and not path.is_dir():
        return "FAIL", f"{path} is not a directory"
    if not model_present and room < device.MODEL_SPACE_MB:
        return "FAIL", f"{where}: the model needs {device.MODEL_SPACE_MB} MB"
    if Path("/tmp") in path.parents:
        # The seed's default. The unit's PrivateTmp= gives the daemon another /tmp.
        return "warn", f"{where}: under /tmp the service sees another one; set NEMO_CACHE_DIR"
    if storage.is_flash_card:
        return "warn", f"{where}: on the {storage.kind} card: slower model loads, more wear"
    if storage.fstype == "tmpfs":
        return "warn", f"{where}: in memory (tmpfs): lost at reboot"
    return "ok", where


def find_model(settings: Settings) -> Path | None:
    """The `.nemo` the daemon loads without a download, where `model.resolve_model` looks:
    NEMO_DIAR_MODEL_PATH, else the pinned repo's file in the cache (`cached_model_path`);
    None when that is not there."""
    if settings.nemo_diar_model_path is not None:
        return settings.nemo_diar_model_path
    cached = cached_model_path(settings)
    return cached if cached.is_file() else None


def _diarization_off(settings: Settings) -> bool:
    # The sessions' own plan decides (edge/plan.py): no session would open a local diarizer.
    return not local_diarizer_used(settings)


def _labels(settings: Settings) -> tuple[Level, str]:
    """Who labels the speakers of a session that does not ask, as its plan decides
    (edge/plan.py; with Google configured as in `settings`, credentials aside)."""
    from edge.stt.google import capabilities

    api = settings.edge_stt_api
    caps = None if api == "none" else (lambda m, lang: capabilities(api, m, lang))
    plan = plan_session(ListenParams(), settings, caps)
    who = {"google": "Google", "sortformer": "the local diarizer", None: "nobody"}[plan.labels]
    why = f": {plan.label_reason}" if plan.label_reason and plan.labels is None else ""
    return "ok", (f"a session that does not ask: labels by {who}{why} "
                  f"(EDGE_STT_DIARIZATION={settings.edge_stt_diarization}, "
                  f"EDGE_DIARIZE_DEFAULT={str(settings.edge_diarize_default).lower()})")


def _model(settings: Settings, model: Path | None) -> tuple[Level, str]:
    if _diarization_off(settings):
        return "ok", "local diarization is off"
    if model is None:
        later = " (the daemon downloads it on first use)" if settings.edge_model_download else ""
        return "warn", f"{cached_model_path(settings)} is not there: run `edge model fetch`{later}"
    size = f"{model.stat().st_size // device.MB} MB"
    pinned = settings.edge_model_sha256
    if pinned is None:
        return "ok", f"{model} ({size}; set EDGE_MODEL_SHA256 to verify it)"
    digest = file_sha256(model)
    if digest != pinned.lower():
        return "FAIL", f"{model}: sha256 {digest} is not EDGE_MODEL_SHA256 {pinned.lower()}"
    return "ok", f"{model} ({size}, sha256 verified)"


def _export(settings: Settings, model: Path | None) -> tuple[Level, str]:
    """Whether a verified ONNX export of the model exists (and with which precisions). Its
    absence only costs speed and memory (the worker runs NeMo), so it is a warning."""
    if _diarization_off(settings):
        return "ok", "local diarization is off"
    if model is None or not model.is_file():
        return "warn", "no model to export yet"
    found, reason = export_status(settings, model, "fp32")
    if found is None:
        return "warn", reason
    int8, _ = export_status(settings, model, "int8")
    precisions = "fp32, int8" if int8 is not None else "fp32 (int8: `edge model export --quantize int8`)"
    sha = found.marker["source_sha256"]
    return "ok", f"{found.folder}: matches the model's sha256 {sha[:12]}; {precisions}"


def _runtime(settings: Settings, model: Path | None) -> tuple[Level, str]:
    """Which runtime and precision the daemon's worker will use (`runtime.plan_runtime`, the
    worker's own decision), and whether that runtime is installed. Warnings only: without a
    runtime the daemon still serves transcripts."""
    if _diarization_off(settings):
        return "ok", "local diarization is off"
    try:
        plan = plan_runtime(settings, model if model is not None and model.is_file() else None)
    except ModelUnavailable as exc:
        return "warn", f"{exc}: the diarizer will be unavailable"
    ok, err = worker_runtime_available(plan.runtime)
    if not ok:
        return "warn", f"{plan.describe()}, but {err}"
    return "ok", plan.describe()


def _nemo(settings: Settings, deep: bool) -> tuple[Level, str]:
    if _diarization_off(settings):
        return "ok", "local diarization is off"
    if deep:  # imports NeMo for real: the worker package owns that import
        from edge.diarization.worker.loading import nemo_importable

        ok, err = nemo_importable()
    else:
        ok, err = nemo_diarization_available()
    if ok:
        return "ok", "NeMo imports" if deep else "NeMo installed (--deep imports it)"
    return "warn", f"NeMo not available: {err}"


def _google(
    settings: Settings, environ: Mapping[str, str], google_default: GoogleDefault
) -> tuple[Level, str]:
    if settings.edge_stt_api == "none":
        return "ok", "no upstream (EDGE_STT_API=none)"
    if settings.edge_stt_endpoint:
        return "ok", f"endpoint {settings.edge_stt_endpoint} (credentials not checked)"
    path = environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    if path:
        if not os.access(path, os.R_OK):
            return "warn", f"GOOGLE_APPLICATION_CREDENTIALS={path}: not a readable file"
        return "ok", f"GOOGLE_APPLICATION_CREDENTIALS={path}"
    try:
        return "ok", google_default()
    except Exception as exc:  # the lookup's reason, or a fake's
        return "warn", f"{exc}; without Google only speaker labels flow"


def _google_default(timeout: float = GOOGLE_TIMEOUT_S, settings: Settings | None = None) -> str:
    """The daemon's own credential lookup (`edge.stt.google.resolve`: ADC in a daemon thread)
    for `settings` (None: the environment's), bounded by `timeout` seconds. Returns what it
    found; raises `RuntimeError` with the reason when nothing usable (or no answer in time)."""
    from edge.stt.google import resolve

    resolved = asyncio.run(resolve(settings or load_settings(), timeout=timeout))
    if resolved.state != "ok":
        raise RuntimeError(resolved.state.removeprefix("unconfigured: "))
    return "application default credentials" + (
        f", project {resolved.project}" if resolved.project else "")


def _port(settings: Settings, daemon_url: str) -> tuple[Level, str]:
    host, port = settings.edge_host, settings.edge_port
    if port == 0:
        return "ok", "EDGE_PORT=0: the OS picks a port"
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
        return "ok", f"{host}:{port} is free"
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            return "FAIL", f"cannot listen on {host}:{port}: {exc.strerror or exc}"
    if _serves_edge(daemon_url):
        return "ok", f"{host}:{port} is served by edge (/health ok)"
    return "FAIL", f"{host}:{port} is taken by another process"


def _serves_edge(daemon_url: str, timeout: float = 2.0) -> bool:
    url = daemon_url.replace("ws", "http", 1) + "/health"
    # Our own daemon on this machine: its certificate may name the device, not this address.
    context = ssl._create_unverified_context() if url.startswith("https") else None
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:
            return json.loads(response.read()) == {"status": "ok"}
    except (OSError, ValueError):
        return False


def _unit(systemd_runs: bool, systemctl: Systemctl) -> tuple[Level, str]:
    if not systemd_runs:
        return "warn", "systemd is not running here: start the daemon with `edge serve`"
    try:
        out = systemctl(["show", UNIT, "-p", "LoadState,ActiveState,SubState,UnitFileState"])
    except (OSError, subprocess.SubprocessError) as exc:
        return "warn", f"systemctl: {exc}"
    props = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    if props.get("LoadState") == "not-found":
        return "warn", f"{UNIT} is not installed (install.sh installs it)"
    active = props.get("ActiveState", "?")
    detail = f"{UNIT} {active} ({props.get('SubState', '?')}), {props.get('UnitFileState', '?')}"
    if active == "failed":
        return "FAIL", f"{detail}: journalctl -u edge -b"
    if active in ("active", "activating", "reloading"):
        return "ok", detail
    return "warn", detail


def _systemctl(args: Sequence[str]) -> str:
    return subprocess.run(
        ["systemctl", *args], capture_output=True, text=True, timeout=10, check=False
    ).stdout


__all__ = ["Check", "failed", "find_model", "render", "render_json", "run_checks"]
