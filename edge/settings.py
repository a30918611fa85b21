"""Every setting of the daemon, in one pydantic-settings class.

Nothing else in the package reads the environment. Names are the environment variables
themselves (lower-cased here), so an operator can grep for what they set: the seed's
`STT_*`/`NEMO_*`/`HF_*` names keep their meaning and defaults, new ones start with `EDGE_`.

The env file is `EDGE_ENV_FILE`, else `/etc/edge/edge.env` if it exists, else `./.env`;
real environment variables win over it. `load_settings()` turns any invalid value into a
`SettingsError` whose message is one line naming the variable, the value and what is allowed.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import annotated_types
from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from edge.clock import FRAME_S

DEFAULT_ENV_FILE = Path("/etc/edge/edge.env")

# The model card's latency presets: chunk_len / chunk_right_context / fifo_len /
# spkcache_update_period / spkcache_len, in 80 ms frames.
DIARIZATION_PRESETS: dict[str, dict[str, int]] = {
    "very-high": {"chunk_len": 340, "chunk_right_context": 40, "fifo_len": 40,
                  "spkcache_update_period": 300, "spkcache_len": 188},
    "high": {"chunk_len": 124, "chunk_right_context": 1, "fifo_len": 124,
             "spkcache_update_period": 124, "spkcache_len": 188},
    "low": {"chunk_len": 6, "chunk_right_context": 7, "fifo_len": 188,
            "spkcache_update_period": 144, "spkcache_len": 188},
    "ultra-low": {"chunk_len": 3, "chunk_right_context": 1, "fifo_len": 188,
                  "spkcache_update_period": 144, "spkcache_len": 188},
}


def _default_cache_dir() -> Path:
    # The seed's default: $TMPDIR/nemo_cache, else /tmp/nemo_cache.
    tmp = os.environ.get("TMPDIR") or "/tmp"
    return Path(tmp) / "nemo_cache"


class SettingsError(ValueError):
    """An invalid setting; `str()` is the one line shown to the operator."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        # An empty `NAME=` line in an env file means "unset", not "invalid".
        case_sensitive=False, extra="ignore", env_file=None, validate_default=True,
        env_ignore_empty=True,
    )

    # --- seed settings (names, defaults and meaning kept) ---
    stt_enable_nemo_diarization_fallback: bool = True
    hf_token: SecretStr | None = None
    nemo_diar_model_path: Path | None = None
    nemo_cache_dir: Path = Field(default_factory=_default_cache_dir)
    stt_nemo_diarization_window_s: float = Field(12.0, gt=0, le=600)
    stt_nemo_diarization_hop_s: float = Field(2.0, ge=FRAME_S, le=60)
    stt_nemo_diarization_timeout_s: float = Field(10.0, gt=0, le=600)
    stt_nemo_diarization_max_speakers: int = Field(4, ge=1, le=4)

    # --- server ---
    edge_host: str = "127.0.0.1"
    edge_port: int = Field(8765, ge=0, le=65535)
    edge_api_keys: SecretStr | None = None
    edge_api_keys_file: Path | None = None
    # Operator keys: accepted wherever API keys are, and alone shown other sessions' ids,
    # file paths and upstream errors (on /ready and /v1/status; others get the summary).
    edge_admin_keys: SecretStr | None = None
    edge_allow_unauthenticated: bool = False
    edge_tls_cert: Path | None = None
    edge_tls_key: Path | None = None
    edge_max_sessions: int = Field(16, ge=1, le=10000)
    edge_status_heartbeat_s: float = Field(10.0, gt=0, le=3600)
    edge_drain_s: float = Field(10.0, ge=0, le=600)
    edge_max_frame_bytes: int = Field(262144, ge=1024, le=16 * 1024 * 1024)
    edge_idle_timeout_s: float = Field(10.0, gt=0, le=3600)
    edge_decode_timeout_s: float = Field(2.0, ge=0.001, le=60)
    # Where containers and compressed codecs are decoded (edge/decode_process.py): "process",
    # one decoder process for all sessions (the loop never waits on FFmpeg; an FFmpeg crash
    # ends only the sessions it was decoding), or "thread", a decoder thread per session in
    # the daemon, which the loop waits on (less CPU, more loop lag: README, Benchmarks).
    edge_decoder: Literal["process", "thread"] = "process"
    edge_handshake_timeout_s: float = Field(10.0, gt=0, le=600)
    edge_label_wait_ms: int = Field(3000, ge=0, le=60000)
    # A session that does not set `diarize` gets labels: room devices want them unasked.
    edge_diarize_default: bool = True
    edge_auth_max_failures: int = Field(10, ge=1, le=100000)
    edge_auth_window_s: float = Field(60.0, gt=0, le=86400)
    # Audio frames one session may send per second (bursts of 1 s worth); beyond it the
    # session gets an Error and is closed 1008. A browser's AudioWorklet sends 375/s at 48 kHz.
    edge_max_frames_per_s: int = Field(500, ge=10, le=100000)
    edge_max_status_clients: int = Field(16, ge=1, le=10000)
    # Connections not yet through auth; the oldest is dropped to admit a new one.
    edge_max_pending_connections: int = Field(256, ge=1, le=100000)
    edge_log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    # --- upstream: Google Cloud Speech-to-Text ---
    edge_stt_api: Literal["v2", "v1", "none"] = "v2"
    edge_stt_project: str | None = None
    edge_stt_location: str = "us"
    edge_stt_model: str = "chirp_3"
    edge_stt_language: str = "auto"
    edge_stt_endpoint: str | None = None
    edge_stt_insecure: bool = False
    edge_stt_diarization: Literal["auto", "google", "local", "off"] = "auto"
    edge_stt_rotate_s: float = Field(290.0, ge=5, le=300)
    edge_stt_replay_s: float = Field(30.0, ge=1, le=600)

    # --- local diarizer (NeMo streaming Sortformer) ---
    edge_model_download: bool = True
    edge_model_sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    edge_model_repo: str = "nvidia/diar_streaming_sortformer_4spk-v2.1"
    edge_diarization_preset: Literal["very-high", "high", "low", "ultra-low"] | None = None
    edge_diarization_memory_mb: int = Field(2048, ge=256, le=1024 * 1024)
    edge_diarization_device: Literal["auto", "cpu", "cuda"] = "auto"
    edge_diarization_threads: int = Field(0, ge=0, le=256)
    # Which worker runtime steps the model: the ONNX export (no torch/NeMo at run time) or NeMo;
    # auto = onnx when a valid export of the resolved model exists, else nemo.
    edge_diarization_runtime: Literal["auto", "onnx", "nemo"] = "auto"
    # The ONNX export's precision (int8 = ONNX Runtime dynamic quantization, `--quantize int8`).
    edge_diarization_precision: Literal["fp32", "int8"] = "fp32"
    # Admission reserves at least this much per session (the measured state is ~1 MB; the
    # floor covers feature buffers and allocator slack, and makes capacity predictable).
    edge_diarization_session_mb: int = Field(16, ge=1, le=65536)
    # Compute admission: sessions x measured RTF (per-session step time / audio) stays under
    # this, since one worker steps every session in turn; 0 turns the compute limit off.
    edge_diarization_max_rtf: float = Field(0.9, ge=0, le=100)
    # Catch-up bound: audio waiting for the worker beyond this is skipped (newest kept).
    edge_diarization_max_backlog_s: float = Field(8.0, ge=1, le=120)
    # TEST ONLY: fault injection rules for the worker (edge/diarization/worker.py `Faults`).
    edge_diarization_faults: str | None = None
    hf_hub_offline: bool = False

    @model_validator(mode="after")
    def _cross_checks(self) -> Settings:
        if self.stt_nemo_diarization_window_s < self.stt_nemo_diarization_hop_s:
            raise _FieldError(
                "stt_nemo_diarization_window_s",
                self.stt_nemo_diarization_window_s,
                f"must be >= STT_NEMO_DIARIZATION_HOP_S ({self.stt_nemo_diarization_hop_s})",
            )
        if (self.edge_tls_cert is None) != (self.edge_tls_key is None):
            name = "edge_tls_key" if self.edge_tls_key is None else "edge_tls_cert"
            raise _FieldError(name, None, "EDGE_TLS_CERT and EDGE_TLS_KEY must be set together")
        for name in ("edge_tls_cert", "edge_tls_key", "edge_api_keys_file"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise _FieldError(name, str(path), "file does not exist or is not readable")
        if self.nemo_diar_model_path is not None and not self.nemo_diar_model_path.exists():
            # Seed contract: a configured path must exist; we never fall back silently.
            raise _FieldError(
                "nemo_diar_model_path", str(self.nemo_diar_model_path), "file does not exist"
            )
        if not self.api_keys() and not self.admin_keys() and not self.edge_allow_unauthenticated \
                and not is_loopback(
            self.edge_host
        ):
            raise _FieldError(
                "edge_host",
                self.edge_host,
                "no API keys configured (EDGE_API_KEYS or EDGE_API_KEYS_FILE): refusing to "
                "listen beyond loopback; set keys or EDGE_ALLOW_UNAUTHENTICATED=true",
            )
        return self

    def api_keys(self) -> tuple[str, ...]:
        """The accepted API keys: `EDGE_API_KEYS` (comma-separated) plus one per line of
        `EDGE_API_KEYS_FILE` (blank lines and `#` comments skipped)."""
        keys: list[str] = []
        if self.edge_api_keys is not None:
            keys += [k.strip() for k in self.edge_api_keys.get_secret_value().split(",")]
        if self.edge_api_keys_file is not None:
            for line in self.edge_api_keys_file.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    keys.append(line)
        return tuple(k for k in keys if k)

    def admin_keys(self) -> tuple[str, ...]:
        """The operator keys: `EDGE_ADMIN_KEYS`, comma-separated."""
        if self.edge_admin_keys is None:
            return ()
        return tuple(k.strip() for k in self.edge_admin_keys.get_secret_value().split(",")
                     if k.strip())

    def diarization_streaming_params(self) -> dict[str, int]:
        """Sortformer streaming parameters (NeMo `sortformer_modules` names, 80 ms frames).

        A preset wins; otherwise hop -> the chunk the model advances by, window -> chunk +
        FIFO (the recent context it sees besides its speaker cache), as docs/ARCHITECTURE.md says.
        """
        if self.edge_diarization_preset is not None:
            params = dict(DIARIZATION_PRESETS[self.edge_diarization_preset])
        else:
            chunk = max(1, round(self.stt_nemo_diarization_hop_s / FRAME_S))
            window = max(chunk, round(self.stt_nemo_diarization_window_s / FRAME_S))
            params = {
                "chunk_len": chunk,
                "chunk_right_context": 1,
                "fifo_len": window - chunk,
                # 144 as in the model card; above chunk + FIFO NeMo clamps it anyway (and warns).
                "spkcache_update_period": min(144, window),
                "spkcache_len": 188,
            }
        params["chunk_left_context"] = 1
        return params


class _FieldError(ValueError):
    """Raised by cross-field checks so the message still names one variable."""

    def __init__(self, field: str, value: Any, allowed: str) -> None:
        super().__init__(allowed)
        self.field, self.value, self.allowed = field, value, allowed


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_env_file(environ: Mapping[str, str]) -> Path | None:
    """`EDGE_ENV_FILE`, else `/etc/edge/edge.env` if present, else `./.env` if present."""
    explicit = environ.get("EDGE_ENV_FILE")
    if explicit:
        return Path(explicit)
    for candidate in (DEFAULT_ENV_FILE, Path(".env")):
        if candidate.is_file():
            return candidate
    return None


def load_settings(**overrides: Any) -> Settings:
    """Build the settings from the process environment and the env file; `overrides`
    (field names) win over both and exist for tests and the CLI's flags.

    Raises `SettingsError` with one line: `NAME='value': what is allowed`.
    """
    env_file = resolve_env_file(os.environ)
    if env_file is not None and (not env_file.exists() or env_file.is_dir()):
        raise SettingsError(f"EDGE_ENV_FILE={str(env_file)!r}: file does not exist")
    try:
        return Settings(_env_file=env_file, **overrides)  # type: ignore[call-arg]
    except ValidationError as exc:
        raise SettingsError(_describe(exc)) from None
    except _FieldError as exc:
        raise SettingsError(_line(exc.field, exc.value, exc.allowed)) from None


def _describe(exc: ValidationError) -> str:
    err = exc.errors()[0]
    field = str(err["loc"][0]) if err["loc"] else ""
    ctx_error = (err.get("ctx") or {}).get("error")
    if isinstance(ctx_error, _FieldError):
        return _line(ctx_error.field, ctx_error.value, ctx_error.allowed)
    value = err.get("input")
    if field in Settings.model_fields:
        return _line(field, value, f"{err['msg']} (allowed: {_allowed(field)})")
    return f"invalid settings: {err['msg']}"


def _line(field: str, value: Any, allowed: str) -> str:
    name = field.upper()
    if name in {"EDGE_API_KEYS", "EDGE_ADMIN_KEYS", "HF_TOKEN"}:
        value = "<secret>"  # never echo a key, even a malformed one
    if value is None:
        return f"{name} (unset): {allowed}"
    return f"{name}={value!r}: {allowed}"


def _allowed(field: str) -> str:
    info = Settings.model_fields[field]
    ann = info.annotation
    args = [a for a in get_args(ann) if a is not type(None)]
    if get_origin(ann) is Literal:
        return " | ".join(map(str, get_args(ann)))
    if args and get_origin(args[0]) is Literal:
        return " | ".join(map(str, get_args(args[0]))) + " (or unset)"
    base = args[0] if args else ann
    bounds = []
    for meta in info.metadata:
        for attr, sym in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            if isinstance(meta, getattr(annotated_types, attr.capitalize())):
                bounds.append(f"{sym} {getattr(meta, attr)}")
        if getattr(meta, "pattern", None):
            return "64 hex digits (a SHA-256)"
    kind = {bool: "true | false", int: "an integer", float: "a number", Path: "a path"}.get(
        base, "a string"
    )
    return f"{kind} {' and '.join(bounds)}".strip()


__all__ = [
    "DIARIZATION_PRESETS",
    "Settings",
    "SettingsError",
    "is_loopback",
    "load_settings",
    "resolve_env_file",
]
