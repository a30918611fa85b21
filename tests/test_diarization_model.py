"""Model resolution, download, verification and loading: each failure is one clear line."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from edge.diarization.model import (
    ModelUnavailable,
    cached_model_path,
    extract_model,
    resolve_model,
)
from edge.diarization.worker.loading import load_model
from tests.fakes.hf_hub import FakeHub, serve_file
from tests.helpers.daemon import ROOT
from tests.helpers.diarization import settings

REPO = "nvidia/diar_streaming_sortformer_4spk-v2.1"


def fake_nemo(path: Path, weights: bytes = b"w" * 3_000_000, config: bytes = b"x: 1\n") -> Path:
    """A tar shaped like a .nemo (enough for resolving, downloading and unpacking)."""
    with tarfile.open(path, "w:") as tar:
        for name, data in (("./model_config.yaml", config), ("./model_weights.ckpt", weights)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_line(exc: pytest.ExceptionInfo[ModelUnavailable]) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


# --- resolution ---

def test_a_configured_path_that_is_gone_is_named(tmp_path: Path) -> None:
    model = fake_nemo(tmp_path / "m.nemo")
    s = settings(tmp_path / "cache", nemo_diar_model_path=model)  # validated while it existed
    model.unlink()
    with pytest.raises(ModelUnavailable) as exc:
        resolve_model(s)
    assert one_line(exc) == f"NEMO_DIAR_MODEL_PATH={model}: file does not exist"


def test_configured_path_wins_over_cache(tmp_path: Path) -> None:
    model = fake_nemo(tmp_path / "m.nemo")
    s = settings(tmp_path / "cache", nemo_diar_model_path=model)
    cached_model_path(s).parent.mkdir(parents=True)
    fake_nemo(cached_model_path(s))
    assert resolve_model(s) == model


def test_a_sha256_mismatch_is_refused_and_the_pin_ignores_case(tmp_path: Path) -> None:
    model = fake_nemo(tmp_path / "m.nemo")
    wrong = "0" * 64
    s = settings(tmp_path / "cache", nemo_diar_model_path=model, edge_model_sha256=wrong)
    with pytest.raises(ModelUnavailable) as exc:
        resolve_model(s)
    assert one_line(exc) == f"{model}: SHA-256 {sha(model)} does not match EDGE_MODEL_SHA256={wrong}"
    ok = settings(tmp_path / "cache", nemo_diar_model_path=model, edge_model_sha256=sha(model).upper())
    assert resolve_model(ok) == model


def test_cached_copy_is_used_and_pinned(tmp_path: Path) -> None:
    s = settings(tmp_path / "cache", hf_hub_offline=True)
    cached = cached_model_path(s)
    assert cached == tmp_path / "cache" / "diar_streaming_sortformer_4spk-v2.1.nemo"
    cached.parent.mkdir(parents=True)
    fake_nemo(cached)
    assert resolve_model(s) == cached
    with pytest.raises(ModelUnavailable, match="does not match EDGE_MODEL_SHA256"):
        resolve_model(settings(tmp_path / "cache", hf_hub_offline=True, edge_model_sha256="a" * 64))


@pytest.mark.parametrize(("flag", "why"), [({"hf_hub_offline": True}, "HF_HUB_OFFLINE=1"),
                                           ({"edge_model_download": False}, "EDGE_MODEL_DOWNLOAD=false")])
def test_an_empty_cache_with_downloads_off_says_why(tmp_path: Path, flag: dict[str, bool], why: str) -> None:
    s = settings(tmp_path / "cache", **{"edge_model_download": True, **flag})
    with pytest.raises(ModelUnavailable) as exc:
        resolve_model(s)
    assert one_line(exc) == (f"no model: NEMO_DIAR_MODEL_PATH is unset, {cached_model_path(s)} does not "
                             f"exist and downloads are off ({why})")


# --- unpacking (before NeMo is touched) ---

def test_a_corrupt_file_is_not_a_valid_nemo_archive(tmp_path: Path) -> None:
    model = tmp_path / "m.nemo"
    model.write_bytes(os.urandom(100_000))
    s = settings(tmp_path / "cache", nemo_diar_model_path=model)
    with pytest.raises(ModelUnavailable) as exc:
        load_model(resolve_model(s), s)
    assert one_line(exc).startswith(f"{model}: not a valid .nemo archive (ReadError")


def test_a_truncated_archive_is_refused_and_leaves_nothing_unpacked(tmp_path: Path) -> None:
    model = fake_nemo(tmp_path / "m.nemo")
    model.write_bytes(model.read_bytes()[:1_000_000])
    s = settings(tmp_path / "cache", nemo_diar_model_path=model)
    with pytest.raises(ModelUnavailable, match=r"not a valid \.nemo archive"):
        extract_model(model, s)
    left = [p.name for p in (tmp_path / "cache" / "extracted").iterdir()]
    assert left == [".lock"]  # nothing half-unpacked left


def test_an_archive_without_a_checkpoint_names_the_missing_files(tmp_path: Path) -> None:
    model = tmp_path / "m.nemo"
    with tarfile.open(model, "w:") as tar:
        tar.addfile(tarfile.TarInfo("./readme.txt"), io.BytesIO(b""))
    with pytest.raises(ModelUnavailable) as exc:
        extract_model(model, settings(tmp_path / "cache"))
    assert one_line(exc) == f"{model}: not a .nemo checkpoint (missing model_config.yaml, model_weights.ckpt)"


def test_unpacks_once_and_again_when_source_changes(tmp_path: Path) -> None:
    model = fake_nemo(tmp_path / "m.nemo")
    s = settings(tmp_path / "cache")
    folder = extract_model(model, s)
    assert folder == tmp_path / "cache" / "extracted" / "m"
    marker = json.loads((folder / "edge-extracted.json").read_text())
    assert marker["sha256"] == sha(model)
    weights = {"size": 3_000_000, "sha256": sha(folder / "model_weights.ckpt")}
    assert marker["files"]["model_weights.ckpt"] == weights
    assert extract_model(model, s) == folder
    assert json.loads((folder / "edge-extracted.json").read_text()) == marker  # not unpacked again
    fake_nemo(model, weights=b"v" * 1000)  # a new checkpoint at the same path
    extract_model(model, s)
    assert json.loads((folder / "edge-extracted.json").read_text())["sha256"] == sha(model)
    (folder / "model_weights.ckpt").write_bytes(b"short")  # damaged copy: unpacked again
    extract_model(model, s)
    assert (folder / "model_weights.ckpt").stat().st_size == 1000
    # A pin the unpacked copy was not made from is never trusted.
    with pytest.raises(ModelUnavailable, match="does not match EDGE_MODEL_SHA256"):
        extract_model(model, settings(tmp_path / "cache", edge_model_sha256="b" * 64))


def test_an_unpacked_file_changed_in_place_is_unpacked_again(tmp_path: Path) -> None:
    """Same size and mtime, other bytes: only the marker's per-file hashes can tell."""
    model = fake_nemo(tmp_path / "m.nemo")
    s = settings(tmp_path / "cache")
    weights = extract_model(model, s) / "model_weights.ckpt"
    st = weights.stat()
    with weights.open("r+b") as f:
        f.write(b"EVIL")
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    extract_model(model, s)
    assert weights.read_bytes() == b"w" * 3_000_000


def test_dead_processes_unpack_temporaries_are_removed(tmp_path: Path) -> None:
    model = fake_nemo(tmp_path / "m.nemo")
    s = settings(tmp_path / "cache")
    extract_model(model, s)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    pid = int(dead.stdout)
    root = tmp_path / "cache" / "extracted"
    left = [root / f".tmp-m-{pid}", root / f".old-m-{pid}"]
    alive = root / ".tmp-m-1"  # pid 1 lives: another process may be unpacking right now
    for d in [*left, alive]:
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "model_weights.ckpt").write_bytes(b"x" * 1000)
    extract_model(model, s)
    assert not any(d.exists() for d in left) and alive.is_dir()
    assert (root / "m" / "model_weights.ckpt").is_file()


def test_the_cache_dir_is_made_private_and_another_users_is_refused(tmp_path: Path) -> None:
    model = fake_nemo(tmp_path / "m.nemo")
    fresh = tmp_path / "nemo_cache"
    extract_model(model, settings(fresh))
    assert fresh.stat().st_mode & 0o777 == 0o700
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    if os.geteuid() != 0:
        pytest.skip("making a directory another user owns needs root")
    os.chown(theirs, 65534, 65534)
    with pytest.raises(ModelUnavailable) as exc:
        resolve_model(settings(theirs, nemo_diar_model_path=model))
    assert one_line(exc).startswith(f"NEMO_CACHE_DIR={theirs} is owned by ")
    assert "uid 65534" in str(exc.value) and "refusing to use it" in str(exc.value)
    assert not (theirs / "extracted").exists()


# --- download from a local hub, through the real huggingface_hub client and the CLI ---

def fetch(cache: Path, hub: FakeHub, *extra: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("EDGE_", "NEMO_", "HF_"))}
    empty = cache.parent / "empty.env"
    empty.write_text("")
    base.update({"HF_ENDPOINT": hub.endpoint, "NEMO_CACHE_DIR": str(cache), "EDGE_ENV_FILE": str(empty),
                 "HF_HUB_DISABLE_TELEMETRY": "1"})
    base.update(env)
    return subprocess.run([sys.executable, "-m", "edge", "model", "fetch", "--no-load", *extra],
                          cwd=ROOT, env=base, capture_output=True, text=True, timeout=120)


def test_fetch_downloads_unpacks_and_then_finds_the_model_in_the_cache(tmp_path: Path) -> None:
    source = fake_nemo(tmp_path / "src.nemo")
    cache = tmp_path / "cache"
    with serve_file(REPO, source) as hub:
        run = fetch(cache, hub, HF_TOKEN="hf_secret")
        assert run.returncode == 0, run.stderr
        got = cache / "diar_streaming_sortformer_4spk-v2.1.nemo"
        assert got.read_bytes() == source.read_bytes()
        assert "download [" in run.stderr and "100%" in run.stderr
        assert (cache / "extracted" / got.stem / "model_weights.ckpt").is_file()
        assert not list(cache.glob("*.partial*"))
        assert ("GET", f"/{REPO}/resolve/main/{got.name}", None) in hub.requests
        # Second run: found in the cache, nothing fetched.
        n = len(hub.requests)
        assert fetch(cache, hub).returncode == 0 and len(hub.requests) == n


def test_the_token_is_never_sent_to_the_redirect_host(tmp_path: Path) -> None:
    """The Hub answers LFS files with a 302 to its CDN: HF_TOKEN goes to the Hub only."""
    source = fake_nemo(tmp_path / "src.nemo")
    key = f"{REPO}/diar_streaming_sortformer_4spk-v2.1.nemo"
    with FakeHub({key: source.read_bytes()}) as cdn, \
            FakeHub({key: source.read_bytes()}, redirect_to=cdn.endpoint) as hub:
        run = fetch(tmp_path / "cache", hub, HF_TOKEN="hf_secret")
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "cache" / key.rsplit("/", 1)[1]).read_bytes() == source.read_bytes()
    assert hub.auth and all(a == "Bearer hf_secret" for _, a in hub.auth), hub.auth
    assert [r[0] for r in cdn.requests] == ["GET"] and cdn.auth == [(cdn.requests[0][1], None)]


def test_download_resumes_a_partial_file(tmp_path: Path) -> None:
    source = fake_nemo(tmp_path / "src.nemo")
    cache = tmp_path / "cache"
    cache.mkdir()
    name = "diar_streaming_sortformer_4spk-v2.1.nemo"
    (cache / f"{name}.partial").write_bytes(source.read_bytes()[:1_234_567])
    info = {"etag": sha(source), "size": source.stat().st_size}
    (cache / f"{name}.partial.json").write_text(json.dumps(info))
    with serve_file(REPO, source) as hub:
        run = fetch(cache, hub)
    assert run.returncode == 0, run.stderr
    assert (cache / name).read_bytes() == source.read_bytes()
    assert next(r for r in hub.requests if r[0] == "GET")[2] == "bytes=1234567-"


def test_download_survives_a_dropped_connection(tmp_path: Path) -> None:
    source = fake_nemo(tmp_path / "src.nemo")
    with serve_file(REPO, source) as hub:
        hub.cut_after = 500_000
        run = fetch(tmp_path / "cache", hub)
    assert run.returncode == 0, run.stderr
    got = tmp_path / "cache" / "diar_streaming_sortformer_4spk-v2.1.nemo"
    assert got.read_bytes() == source.read_bytes()
    # huggingface_hub retried by itself (from the last whole 10 MB block it had written: 0 here).
    assert len([r for r in hub.requests if r[0] == "GET"]) == 2


def test_download_checks_free_space_first(tmp_path: Path) -> None:
    source = fake_nemo(tmp_path / "src.nemo")
    with serve_file(REPO, source) as hub:
        hub.claimed_size = 10**15
        run = fetch(tmp_path / "cache", hub)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1].startswith(
        f"edge: model unavailable: not enough free space in {tmp_path / 'cache'}: need 2000000.07 GB")
    assert not [r for r in hub.requests if r[0] == "GET"]


def test_download_errors_are_one_line(tmp_path: Path) -> None:
    source = fake_nemo(tmp_path / "src.nemo")
    with serve_file("someone/else", source) as hub:
        run = fetch(tmp_path / "cache", hub)
        assert run.returncode == 1
        last = run.stderr.strip().splitlines()[-1]
        assert last.startswith(f"edge: model unavailable: cannot download {REPO}/"), last
    with serve_file(REPO, source) as hub:
        pinned = fetch(tmp_path / "cache", hub, EDGE_MODEL_SHA256="c" * 64)
    assert pinned.returncode == 1
    assert pinned.stderr.strip().splitlines()[-1].endswith(f"does not match EDGE_MODEL_SHA256={'c' * 64}")


# --- loading through NeMo ---

@pytest.mark.nemo
def test_the_tiny_model_loads_in_eval_mode_from_one_unpacked_copy(tmp_path: Path) -> None:
    from tests.fakes.sortformer import tiny_model_path

    s = settings(tmp_path / "cache", nemo_diar_model_path=tiny_model_path(),
                 edge_model_sha256=sha(tiny_model_path()))
    model = load_model(resolve_model(s), s)
    assert type(model).__name__ == "SortformerEncLabelModel" and not model.training
    marker = tmp_path / "cache" / "extracted" / tiny_model_path().stem / "edge-extracted.json"
    first = marker.read_text()
    load_model(resolve_model(s), s)
    assert marker.read_text() == first


@pytest.mark.nemo
def test_pickle_payload_is_refused(tmp_path: Path) -> None:
    import torch

    from tests.fakes.sortformer import tiny_model_path

    sentinel = tmp_path / "pwned"

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, (f"touch {sentinel}",))

    buf = io.BytesIO()
    torch.save({"x": Payload()}, buf)
    with tarfile.open(tiny_model_path()) as tar:
        config = tar.extractfile("./model_config.yaml").read()  # type: ignore[union-attr]
    model = fake_nemo(tmp_path / "evil.nemo", weights=buf.getvalue(), config=config)
    s = settings(tmp_path / "cache", nemo_diar_model_path=model)
    with pytest.raises(ModelUnavailable) as exc:
        load_model(resolve_model(s), s)
    assert one_line(exc).startswith(f"{model}: cannot load: ")
    assert not sentinel.exists()


@pytest.mark.nemo
def test_a_config_target_outside_nemos_allowlist_is_refused(tmp_path: Path) -> None:
    """`_target_: nemo.utils.model_utils.os.system` passes a mere prefix check ("nemo.utils."),
    as NeMo < 2.6 did; NeMo >= 2.6 (pyproject's floor) resolves it and refuses what it is."""
    from omegaconf import OmegaConf

    from tests.fakes.sortformer import tiny_model_path

    with tarfile.open(tiny_model_path()) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]
    cfg = OmegaConf.create(members["./model_config.yaml"].decode())
    cfg.preprocessor._target_ = "nemo.utils.model_utils.os.system"
    model = fake_nemo(tmp_path / "evil.nemo", weights=members["./model_weights.ckpt"],
                      config=OmegaConf.to_yaml(cfg).encode())
    s = settings(tmp_path / "cache", nemo_diar_model_path=model)
    with pytest.raises(ModelUnavailable) as exc:
        load_model(resolve_model(s), s)
    assert one_line(exc).startswith(f"{model}: cannot load: UnsafeTargetError"), str(exc.value)


def test_the_nemo_floor_has_the_resolving_target_allowlist() -> None:
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    floors = [d for extra in deps.values() for d in extra if d.startswith("nemo_toolkit")]
    assert floors and all(re.search(r">=\s*(2\.(?:[6-9]|\d\d)|[3-9])", d) for d in floors), floors
