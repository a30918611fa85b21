"""`edge check`: each check from simulated inputs, then the command itself."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from edge import checks, cli
from edge.checks import Check
from edge.settings import load_settings
from tests.fakes.machine import FakeMachine, sd_card_jetson
from tests.helpers.daemon import ROOT, daemon_env, running_app

MODEL = "diar_streaming_sortformer_4spk-v2.1.nemo"


def _no_google() -> str:
    raise RuntimeError("Your default credentials were not found")


def _systemctl(active: str, load: str = "loaded") -> checks.Systemctl:
    def run(args: Sequence[str]) -> str:
        assert list(args[:2]) == ["show", "edge.service"]
        return (f"LoadState={load}\nActiveState={active}\nSubState=running\n"
                "UnitFileState=enabled\n")
    return run


def _run(tmp_path: Path, machine: FakeMachine | None = None, *, environ: dict[str, str] | None = None,
         systemctl: checks.Systemctl | None = None, **settings: Any) -> dict[str, Check]:
    if machine is None:  # a device booted from NVMe, made afresh for each call
        machine = FakeMachine(Path(tempfile.mkdtemp(dir=tmp_path))).mount("/", "nvme0n1p1")
    # Not under /tmp (which the check warns about); it need not exist.
    settings.setdefault("nemo_cache_dir", Path("/srv/edge-cache"))
    settings.setdefault("edge_port", 0)
    found = checks.run_checks(
        load_settings(**settings), env_file=None, environ=environ or {},
        daemon_url="ws://127.0.0.1:1", root=machine.root, free=machine.free(),
        systemctl=systemctl or _systemctl("active"), google_default=_no_google,
    )
    return {c.name: c for c in found}


def _levels(found: dict[str, Check]) -> dict[str, str]:
    return {name: c.level for name, c in found.items()}


def test_every_check_has_a_line(tmp_path: Path) -> None:
    found = _run(tmp_path)
    assert list(found) == ["platform", "config", "packages", "cache", "model", "export", "runtime",
                           "nemo", "google", "labels", "port", "unit"]
    text = checks.render(list(found.values()))
    assert text.splitlines()[0].startswith("ok    platform  ")
    assert not checks.failed(list(found.values()))


def test_cache_check_warns_on_the_sd_card_or_under_tmp_and_fails_without_room(tmp_path: Path) -> None:
    nvme = _run(tmp_path)["cache"]
    assert nvme.level == "ok" and "(nvme nvme0n1, 100000 MB free)" in nvme.detail
    sd = _run(tmp_path, sd_card_jetson(tmp_path / "sd"))["cache"]
    assert sd.level == "warn" and "on the sd card" in sd.detail
    full = FakeMachine(tmp_path / "full").mount("/", "nvme0n1p1", free_mb=100)
    low = _run(tmp_path, full)["cache"]
    assert low.level == "FAIL" and low.detail.endswith("100 MB free): the model needs 1024 MB")
    tmp = _run(tmp_path, nemo_cache_dir=Path("/tmp/nemo_cache"))["cache"]
    assert tmp.level == "warn" and "under /tmp the service sees another one" in tmp.detail


def test_model_check_warns_when_missing_verifies_the_pin_and_fails_on_a_mismatch(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    missing = _run(tmp_path, nemo_cache_dir=cache)["model"]
    assert (missing.level, missing.detail) == (
        "warn", f"{cache / MODEL} is not there: run `edge model fetch` "
        "(the daemon downloads it on first use)")
    # Elsewhere in the cache (Hugging Face's own layout) the daemon does not look: neither do we.
    snapshot = cache / "models--nvidia--x/snapshots/abc"
    snapshot.mkdir(parents=True)
    (snapshot / MODEL).write_bytes(b"weights")
    assert _run(tmp_path, nemo_cache_dir=cache)["model"].level == "warn"
    (snapshot / MODEL).rename(cache / MODEL)
    digest = hashlib.sha256(b"weights").hexdigest()
    assert _run(tmp_path, nemo_cache_dir=cache)["model"].level == "ok"
    verified = _run(tmp_path, nemo_cache_dir=cache, edge_model_sha256=digest.upper())["model"]
    assert verified.level == "ok" and "sha256 verified" in verified.detail
    wrong = _run(tmp_path, nemo_cache_dir=cache, edge_model_sha256="0" * 64)["model"]
    assert wrong.level == "FAIL" and digest in wrong.detail
    off = _run(tmp_path, stt_enable_nemo_diarization_fallback=False)
    assert (off["model"].level, off["nemo"].detail) == ("ok", "local diarization is off")


@pytest.mark.parametrize(("overrides", "who", "local"), [
    ({}, "by the local diarizer", True),  # chirp_3 + auto: Google cannot
    ({"edge_stt_api": "v1", "edge_stt_language": "en-US", "edge_stt_model": "latest_long"},
     "by Google", True),  # the local diarizer still serves speaker_turns=true
    ({"edge_stt_diarization": "off"}, "by nobody: EDGE_STT_DIARIZATION=off", False),
    ({"edge_stt_diarization": "google"}, "by Google", False),
    ({"edge_diarize_default": False}, "by nobody", True),
    ({"edge_stt_api": "none"}, "by the local diarizer", True),
])
def test_labels_check_asks_the_session_plan(tmp_path: Path, overrides: dict[str, Any],
                                            who: str, local: bool) -> None:
    found = _run(tmp_path, **overrides)
    assert found["labels"].level == "ok" and f"labels {who}" in found["labels"].detail
    assert (found["nemo"].detail != "local diarization is off") is local


def test_export_matches_the_model(tmp_path: Path) -> None:
    from edge.diarization.exports import export_dir
    from tests.helpers.diarization import hand_made_export

    cache = tmp_path / "cache"
    none = _run(tmp_path, nemo_cache_dir=cache)["export"]
    assert (none.level, none.detail) == ("warn", "no model to export yet")
    model = tmp_path / "mine.nemo"
    model.write_bytes(b"weights")
    s = load_settings(nemo_cache_dir=cache, nemo_diar_model_path=model)
    folder = export_dir(s, model)
    missing = _run(tmp_path, nemo_cache_dir=cache, nemo_diar_model_path=model)["export"]
    assert (missing.level, missing.detail) == ("warn", f"no export in {folder}: run `edge model export`")
    hand_made_export(folder, model)
    fp32 = _run(tmp_path, nemo_cache_dir=cache, nemo_diar_model_path=model)["export"]
    sha = hashlib.sha256(b"weights").hexdigest()
    assert (fp32.level, fp32.detail) == (
        "ok", f"{folder}: matches the model's sha256 {sha[:12]}; "
        "fp32 (int8: `edge model export --quantize int8`)")
    other = tmp_path / "other.nemo"
    other.write_bytes(b"other weights")
    shutil.rmtree(folder)
    hand_made_export(folder, other, ("fp32", "int8"))
    foreign = _run(tmp_path, nemo_cache_dir=cache, nemo_diar_model_path=model)["export"]
    assert foreign.level == "warn" and "was made from SHA-256 " in foreign.detail
    shutil.rmtree(folder)
    hand_made_export(folder, model, ("fp32", "int8"))
    both = _run(tmp_path, nemo_cache_dir=cache, nemo_diar_model_path=model)["export"]
    assert both.detail.endswith("; fp32, int8")
    off = _run(tmp_path, nemo_cache_dir=cache, nemo_diar_model_path=model, edge_stt_diarization="off")
    assert off["export"].detail == "local diarization is off"


def test_runtime_line_says_what_the_worker_will_use(tmp_path: Path) -> None:
    from edge.diarization.exports import export_dir
    from tests.helpers.diarization import hand_made_export

    cache = tmp_path / "cache"
    model = tmp_path / "mine.nemo"
    model.write_bytes(b"weights")
    s = load_settings(nemo_cache_dir=cache, nemo_diar_model_path=model)
    auto = _run(tmp_path, nemo_cache_dir=cache, nemo_diar_model_path=model)["runtime"]
    assert auto.level == "ok" and auto.detail.startswith("nemo (no usable fp32 ONNX export: no export in ")
    assert "edge model export" in auto.detail
    onnx = _run(tmp_path, nemo_cache_dir=cache, nemo_diar_model_path=model,
                edge_diarization_runtime="onnx")["runtime"]
    assert onnx.level == "warn" and onnx.detail.startswith("EDGE_DIARIZATION_RUNTIME=onnx but no export in ")
    assert onnx.detail.endswith(": the diarizer will be unavailable")
    folder = export_dir(s, model)
    hand_made_export(folder, model, ("fp32", "int8"))
    fp32 = _run(tmp_path, nemo_cache_dir=cache, nemo_diar_model_path=model)["runtime"]
    assert (fp32.level, fp32.detail) == ("ok", f"onnx fp32 ({folder / 'model.onnx'})")
    int8 = _run(tmp_path, nemo_cache_dir=cache, nemo_diar_model_path=model,
                edge_diarization_precision="int8")["runtime"]
    assert int8.detail == f"onnx int8 ({folder / 'model.int8.onnx'})"
    nemo = _run(tmp_path, nemo_cache_dir=cache, nemo_diar_model_path=model,
                edge_diarization_runtime="nemo")["runtime"]
    assert nemo.detail == "nemo (EDGE_DIARIZATION_RUNTIME=nemo)"


def test_configured_model_path_is_the_model(tmp_path: Path) -> None:
    model = tmp_path / "mine.nemo"
    model.write_bytes(b"x")
    assert str(model) in _run(tmp_path, nemo_diar_model_path=model)["model"].detail


def test_nemo_missing_is_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checks, "nemo_diarization_available",
                        lambda deep=False: (False, "No module named 'nemo'"))
    nemo = _run(tmp_path)["nemo"]
    assert (nemo.level, nemo.detail) == ("warn", "NeMo not available: No module named 'nemo'")


def test_google_check_is_ok_with_credentials_or_an_endpoint_and_warns_without(tmp_path: Path) -> None:
    assert _run(tmp_path)["google"].level == "warn"
    creds = tmp_path / "sa.json"
    creds.write_text("{}")
    found = _run(tmp_path, environ={"GOOGLE_APPLICATION_CREDENTIALS": str(creds)})["google"]
    assert found.level == "ok"
    gone = _run(tmp_path, environ={"GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "no")})
    assert gone["google"].level == "warn"
    endpoint = _run(tmp_path, edge_stt_endpoint="127.0.0.1:50051")["google"]
    assert endpoint.level == "ok" and "127.0.0.1:50051" in endpoint.detail
    assert _run(tmp_path, edge_stt_api="none")["google"].level == "ok"


@pytest.mark.parametrize("overrides", [
    {"edge_stt_api": "v1", "edge_stt_language": "auto"},
    {"edge_stt_api": "v2"},  # with a credentials file that is not there
])
def test_google_lookup_says_what_the_daemons_upstream_check_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, overrides: dict[str, Any]
) -> None:
    from edge.stt import google

    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "gone.json"))
    settings = load_settings(**overrides)
    daemon = asyncio.run(google.check(settings))
    assert daemon.startswith("unconfigured: ")
    with pytest.raises(RuntimeError) as err:
        checks._google_default(settings=settings)
    assert str(err.value) == daemon.removeprefix("unconfigured: ")
    assert ("gone.json" in str(err.value)) is (overrides["edge_stt_api"] == "v2")


@contextlib.contextmanager
def _silent_metadata_server() -> Iterator[tuple[str, list[socket.socket]]]:
    """A stand-in for the GCE metadata server that accepts connections and never answers, as
    a firewalled link-local address can do: yields its `host:port` and the connections made."""
    accepted: list[socket.socket] = []
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()

        def accept() -> None:
            with contextlib.suppress(OSError):  # the listening socket closed: done
                while True:
                    accepted.append(server.accept()[0])

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        try:
            yield f"127.0.0.1:{server.getsockname()[1]}", accepted
        finally:
            for conn in accepted:
                conn.close()


def test_google_default_is_bounded(tmp_path: Path) -> None:
    """With no credentials anywhere, google.auth.default() asks the GCE metadata server, and
    one that never answers holds it for 3 s per try (3 tries). The probe gives up within its
    bound instead, saying so. In a child process: google-auth reads the metadata address from
    the environment when first imported."""
    bound = 1.0
    code = (
        "import json, sys, time\n"
        "import google.auth, google.auth.transport.requests\n"  # not timed: imports are slow
        "from edge import checks\n"
        "t0 = time.monotonic()\n"
        "try:\n"
        f"    outcome = 'answered: ' + checks._google_default(timeout={bound})\n"
        "except Exception as exc:\n"
        "    outcome = type(exc).__name__ + ': ' + str(exc)\n"
        "print(json.dumps({'elapsed': time.monotonic() - t0, 'outcome': outcome}))\n"
    )
    with _silent_metadata_server() as (address, accepted):
        env = {k: v for k, v in daemon_env().items()
               if not k.startswith(("GOOGLE_", "GCE_", "CLOUDSDK_", "GAE_", "NO_GCE"))}
        env.update(HOME=str(tmp_path), CLOUDSDK_CONFIG=str(tmp_path / "gcloud"),
                   GCE_METADATA_HOST=address, GCE_METADATA_IP=address)
        child = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=120)
        assert child.returncode == 0, child.stderr
        found = json.loads(child.stdout)
        assert accepted, "the probe never reached the metadata stand-in: nothing was bounded"
    assert not found["outcome"].startswith("answered") and f"{bound:g} s" in found["outcome"], found
    assert bound <= found["elapsed"] < bound + 1.5, found


def test_port_check_fails_when_another_process_holds_the_port() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        taken = checks._port(load_settings(edge_port=port), f"ws://127.0.0.1:{port}")
        assert taken == ("FAIL", f"127.0.0.1:{port} is taken by another process")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
    assert checks._port(load_settings(edge_port=free_port), "ws://127.0.0.1:1")[0] == "ok"


async def test_port_held_by_our_daemon_is_ok() -> None:
    async with running_app() as app:
        port = app.server.port
        settings = load_settings(edge_port=port)
        # In a thread: the probe is a blocking HTTP request to the daemon on this loop.
        level, detail = await asyncio.to_thread(checks._port, settings, f"ws://127.0.0.1:{port}")
    assert (level, detail) == ("ok", f"127.0.0.1:{port} is served by edge (/health ok)")


@pytest.mark.parametrize(("active", "load", "level"), [
    ("active", "loaded", "ok"), ("activating", "loaded", "ok"), ("inactive", "loaded", "warn"),
    ("failed", "loaded", "FAIL"), ("inactive", "not-found", "warn"),
])
def test_unit_check_level_follows_the_units_state(tmp_path: Path, active: str, load: str, level: str) -> None:
    machine = FakeMachine(tmp_path / "m").mount("/", "nvme0n1p1")
    (machine.root / "run/systemd/system").mkdir(parents=True)
    unit = _run(tmp_path, machine, systemctl=_systemctl(active, load))["unit"]
    assert unit.level == level
    if load == "not-found":
        assert "not installed" in unit.detail


def test_unit_without_systemd_is_a_warning(tmp_path: Path) -> None:
    unit = _run(tmp_path)["unit"]
    assert (unit.level, unit.detail) == (
        "warn", "systemd is not running here: start the daemon with `edge serve`",
    )


def test_systemd_python_is_required_where_systemd_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    machine = FakeMachine(tmp_path / "m").mount("/", "nvme0n1p1")
    (machine.root / "run/systemd/system").mkdir(parents=True)
    real = checks.missing_packages
    monkeypatch.setattr(checks, "missing_packages",
                        lambda names: list(names) if names == ("systemd.daemon",) else real(names))
    packages = _run(tmp_path, machine)["packages"]
    assert packages.level == "FAIL" and "READY=1" in packages.detail


# --- the command ---

def test_edge_check_prints_json_and_exits_1_on_a_required_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(checks, "_google_default", _no_google)
    # A model in the cache: this machine's free space then cannot fail the cache check.
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / MODEL).write_bytes(b"weights")
    monkeypatch.setenv("NEMO_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("EDGE_PORT", "0")
    assert cli.main(["check", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True
    assert {c["name"] for c in report["checks"]} >= {"platform", "cache", "model", "unit"}

    with socket.socket() as busy:  # a foreign listener on the port is a required failure
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        monkeypatch.setenv("EDGE_PORT", str(busy.getsockname()[1]))
        assert cli.main(["check"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("FAIL  port") for line in lines)


def test_edge_check_reads_google_credentials_from_the_env_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    creds = tmp_path / "sa.json"
    creds.write_text("{}")
    (tmp_path / MODEL).write_bytes(b"weights")
    env = tmp_path / "edge.env"
    env.write_text(f"GOOGLE_APPLICATION_CREDENTIALS={creds}\nEDGE_PORT=0\n"
                   f"NEMO_CACHE_DIR={tmp_path}\n")
    monkeypatch.setenv("EDGE_ENV_FILE", str(env))
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    cli.main(["check", "--json"])
    report = {c["name"]: c for c in json.loads(capsys.readouterr().out)["checks"]}
    assert report["google"] == {"name": "google", "level": "ok",
                                "detail": f"GOOGLE_APPLICATION_CREDENTIALS={creds}"}
    assert report["config"]["detail"] == f"env file {env}"
