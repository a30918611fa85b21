"""Settings: every seed name from env and env file, and one clear line for every bad value."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edge.settings import load_settings
from tests.helpers.daemon import ROOT, daemon_env

SEED_VALUES = {
    "STT_ENABLE_NEMO_DIARIZATION_FALLBACK": ("false", "stt_enable_nemo_diarization_fallback", False),
    "NEMO_CACHE_DIR": ("/data/nemo_cache", "nemo_cache_dir", Path("/data/nemo_cache")),
    "STT_NEMO_DIARIZATION_WINDOW_S": ("20", "stt_nemo_diarization_window_s", 20.0),
    "STT_NEMO_DIARIZATION_HOP_S": ("1.5", "stt_nemo_diarization_hop_s", 1.5),
    "STT_NEMO_DIARIZATION_TIMEOUT_S": ("3", "stt_nemo_diarization_timeout_s", 3.0),
    "STT_NEMO_DIARIZATION_MAX_SPEAKERS": ("2", "stt_nemo_diarization_max_speakers", 2),
    "EDGE_PORT": ("9000", "edge_port", 9000),
    "EDGE_MAX_SESSIONS": ("3", "edge_max_sessions", 3),
    "EDGE_STATUS_HEARTBEAT_S": ("2.5", "edge_status_heartbeat_s", 2.5),
}


def test_defaults_are_the_seed_values_and_the_cache_follows_tmpdir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", "/var/tmp")
    s = load_settings()
    assert s.stt_enable_nemo_diarization_fallback is True
    assert s.hf_token is None and s.nemo_diar_model_path is None
    assert s.nemo_cache_dir == Path("/var/tmp/nemo_cache")
    assert (s.stt_nemo_diarization_window_s, s.stt_nemo_diarization_hop_s) == (12.0, 2.0)
    assert s.stt_nemo_diarization_timeout_s == 10.0
    assert s.stt_nemo_diarization_max_speakers == 4
    assert (s.edge_host, s.edge_port) == ("127.0.0.1", 8765)
    monkeypatch.delenv("TMPDIR")
    assert load_settings().nemo_cache_dir == Path("/tmp/nemo_cache")


@pytest.mark.parametrize("name", sorted(SEED_VALUES))
def test_each_seed_variable_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    raw, field, expected = SEED_VALUES[name]
    monkeypatch.setenv(name, raw)
    assert getattr(load_settings(), field) == expected


def test_the_env_file_is_read_and_the_environment_wins_over_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    model = tmp_path / "m.nemo"
    model.write_bytes(b"x")
    env_file = tmp_path / "edge.env"
    lines = [f"{name}={raw}" for name, (raw, _, _) in SEED_VALUES.items()]
    lines += [f"NEMO_DIAR_MODEL_PATH={model}", "HF_TOKEN=hf_secret", "# a comment", "EDGE_TLS_CERT="]
    env_file.write_text("\n".join(lines) + "\n")
    monkeypatch.setenv("EDGE_ENV_FILE", str(env_file))
    s = load_settings()
    for _name, (_, field, expected) in SEED_VALUES.items():
        assert getattr(s, field) == expected
    assert s.nemo_diar_model_path == model
    assert s.hf_token is not None and s.hf_token.get_secret_value() == "hf_secret"
    assert "hf_secret" not in repr(s)
    monkeypatch.setenv("EDGE_PORT", "9100")
    assert load_settings().edge_port == 9100


def test_api_keys_are_merged_from_the_variable_and_the_keys_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# room keys\nkey-c\n\n key-d \n")
    monkeypatch.setenv("EDGE_API_KEYS", "key-a, key-b,")
    monkeypatch.setenv("EDGE_API_KEYS_FILE", str(keys))
    assert load_settings().api_keys() == ("key-a", "key-b", "key-c", "key-d")


def test_hop_and_window_map_to_streaming_params(monkeypatch: pytest.MonkeyPatch) -> None:
    p = load_settings().diarization_streaming_params()
    assert (p["chunk_len"], p["chunk_len"] + p["fifo_len"]) == (25, 150)
    monkeypatch.setenv("EDGE_DIARIZATION_PRESET", "high")
    assert load_settings().diarization_streaming_params()["chunk_len"] == 124


BAD = [
    ("STT_NEMO_DIARIZATION_HOP_S", "abc", "a number"),
    ("STT_NEMO_DIARIZATION_HOP_S", "0", ">= 0.08"),
    ("STT_NEMO_DIARIZATION_WINDOW_S", "-1", "> 0"),
    ("STT_NEMO_DIARIZATION_WINDOW_S", "1", ">= STT_NEMO_DIARIZATION_HOP_S"),
    ("STT_NEMO_DIARIZATION_TIMEOUT_S", "never", "a number"),
    ("STT_NEMO_DIARIZATION_MAX_SPEAKERS", "5", "<= 4"),
    ("STT_NEMO_DIARIZATION_MAX_SPEAKERS", "0", ">= 1"),
    ("STT_ENABLE_NEMO_DIARIZATION_FALLBACK", "maybe", "true | false"),
    ("NEMO_DIAR_MODEL_PATH", "/nonexistent/model.nemo", "does not exist"),
    ("EDGE_PORT", "70000", "<= 65535"),
    ("EDGE_MAX_SESSIONS", "many", "an integer"),
    ("EDGE_STT_API", "v3", "v2 | v1 | none"),
    ("EDGE_MODEL_SHA256", "abc", "SHA-256"),
    ("EDGE_HOST", "0.0.0.0", "EDGE_ALLOW_UNAUTHENTICATED"),
    ("EDGE_TLS_CERT", "/nonexistent.pem", "EDGE_TLS_KEY"),
]


@pytest.mark.parametrize(("name", "value", "hint"), BAD)
def test_invalid_value_exits_2_with_one_line(name: str, value: str, hint: str) -> None:
    env = daemon_env(**{name: value})
    if name == "EDGE_HOST":
        env.pop("EDGE_API_KEYS")
    proc = subprocess.run(
        [sys.executable, "-m", "edge", "serve"], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert name in line and hint in line
    if name not in ("EDGE_HOST", "EDGE_TLS_CERT"):
        assert repr(value) in line or value in line



@pytest.mark.parametrize(("name", "value", "says"), [
    ("EDGE_MAX_FRAMES_PER_S", "5", ">= 10"),
    ("EDGE_MAX_STATUS_CLIENTS", "0", ">= 1"),
    ("EDGE_MAX_PENDING_CONNECTIONS", "lots", "an integer"),
])
def test_client_bounds_are_checked(monkeypatch: pytest.MonkeyPatch, name: str, value: str,
                                   says: str) -> None:
    from edge.settings import SettingsError

    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert str(err.value).startswith(f"{name}={value!r}") and says in str(err.value)


def test_admin_keys_are_keys_and_never_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_ADMIN_KEYS", " op-1 , op-2 ,")
    monkeypatch.setenv("EDGE_HOST", "0.0.0.0")  # keys (admin ones only) allow a public bind
    s = load_settings()
    assert s.admin_keys() == ("op-1", "op-2") and s.api_keys() == ()
    assert "op-1" not in repr(s)
