"""Verify once per daemon life: a restarted worker reuses the digests its predecessor verified,
for files whose stat identity is unchanged, and hashes again any file written since.

The unit tests drive `DigestCache` on real files; the last test runs the real supervisor and
worker (onnx runtime, tiny model) and kills the worker with SIGKILL.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from edge.diarization.digests import MAX_DIGESTS, RACY_NS, DigestCache
from edge.diarization.model import extract_model
from tests.helpers.daemon import ROOT
from tests.helpers.diarization import settings
from tests.helpers.worker import ready, until

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("no_orphans")]


def rewrite_in_place(path: Path) -> None:
    """Write a file's first byte back unchanged and put its mtime back: same size, bytes and
    mtime, only the ctime moves (as after `cp --preserve=timestamps` over it)."""
    before = path.stat()
    with path.open("r+b") as f:
        first = f.read(1)
        f.seek(0)
        f.write(first)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # mtime as it was: only ctime tells


def entry(path: Path, sha256: str) -> dict[str, Any]:
    """A `verified()` entry for `path` as it is now, claiming `sha256`."""
    st = path.stat()
    return {"path": str(path), "st_dev": st.st_dev, "st_ino": st.st_ino, "st_size": st.st_size,
            "st_mtime_ns": st.st_mtime_ns, "st_ctime_ns": st.st_ctime_ns, "sha256": sha256}


def test_a_seeded_digest_is_used_only_while_the_stat_identity_matches(tmp_path: Path) -> None:
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"a" * 1000)
    b.write_bytes(b"b" * 1000)
    real_a, real_b = DigestCache().sha256(a), DigestCache().sha256(b)
    # A lie in the seed shows whether the seed was used: an unchanged file gets the recorded
    # value without being read; a file changed since (same size, same mtime) is read again.
    lie = "0" * 64
    seed = [entry(a, lie), entry(b, lie)]
    time.sleep(0.05)  # past one timestamp tick (<= 10 ms), so the write below moves b's ctime
    b.write_bytes(b"c" * 1000)
    os.utime(b, ns=(seed[1]["st_mtime_ns"], seed[1]["st_mtime_ns"]))
    cache = DigestCache()
    assert cache.seed(seed) == 1  # b's ctime moved: not taken
    assert cache.sha256(a) == lie and list(cache.reused) == [str(a)] and list(cache.hashed) == []
    assert cache.sha256(b) not in (real_b, lie) and list(cache.hashed) == [str(b)]
    # After the fact too: a seeded entry whose file is rewritten is not trusted any more.
    time.sleep(0.05)
    rewrite_in_place(a)
    assert cache.sha256(a) == real_a and list(cache.hashed) == [str(b), str(a)]


def test_only_settled_files_are_handed_on(tmp_path: Path) -> None:
    fresh = tmp_path / "fresh.bin"
    fresh.write_bytes(b"x")
    old = ROOT / "pyproject.toml"  # written when the checkout was made, not just now
    assert old.stat().st_ctime_ns < time.time_ns() - 2 * RACY_NS
    cache = DigestCache()
    cache.sha256(fresh)
    cache.sha256(old)
    # The fresh file could change again within its timestamp tick unseen: the next worker
    # hashes it itself.
    assert [e["path"] for e in cache.verified()] == [str(old)]


def test_a_seed_ignores_malformed_and_excess_entries(tmp_path: Path) -> None:
    files = [tmp_path / f"{i}.bin" for i in range(MAX_DIGESTS + 3)]
    for f in files:
        f.write_bytes(f.name.encode())
    good = [entry(f, "a" * 64) for f in files]
    bad: list[Any] = [{"path": str(files[0])}, {**good[0], "st_ino": "x"}, 7, {**good[0], "sha256": "ab"}]
    assert DigestCache().seed(bad + good) == MAX_DIGESTS
    assert DigestCache().seed("not a list") == 0


def test_extraction_records_the_copy_and_a_changed_copy_is_rehashed(tmp_path: Path) -> None:
    pytest.importorskip("nemo")
    from tests.fakes.sortformer import tiny_model_path

    s = settings(tmp_path / "cache", nemo_diar_model_path=tiny_model_path())
    import edge.diarization.digests as digests

    folder = extract_model(tiny_model_path(), s)
    weights = folder / "model_weights.ckpt"
    before = list(digests._digests.hashed)
    assert extract_model(tiny_model_path(), s) == folder
    assert list(digests._digests.hashed) == before  # the marker check used the cache
    rewrite_in_place(weights)
    assert extract_model(tiny_model_path(), s) == folder
    assert list(digests._digests.hashed)[-1] == str(weights.resolve())


async def test_a_restarted_worker_reuses_verified_digests_and_rehashes_a_changed_file(
    tmp_path: Path,
) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("nemo")  # the export is made with NeMo, once, into the test-model cache
    from edge.diarization.engine import DiarizationEngine
    from edge.health import Status
    from edge.metrics import Metrics
    from tests.fakes.sortformer import tiny_model_path
    from tests.helpers.onnx import install_export

    tiny = tiny_model_path()
    cache = tmp_path / "cache"
    folder = install_export(tiny, cache)
    model = tmp_path / tiny.name  # a copy of our own to rewrite (the export is keyed by content)
    shutil.copyfile(tiny, model)
    await asyncio.sleep(RACY_NS / 1e9 + 0.1)  # files written just now are not handed on (racy clean)
    s = settings(cache, nemo_diar_model_path=model, edge_diarization_runtime="onnx",
                 edge_diarization_max_rtf=0)
    engine = DiarizationEngine(s, Status(max_sessions=4), Metrics())
    await engine.start()
    try:
        await ready(engine)
        first = engine.figures
        # The checkpoint (it names the export) and the export's files (checked against its marker).
        onnx = {p for p in first["hashed"] if p.startswith(f"{folder.resolve()}/") and p.endswith(".onnx")}
        assert str(model.resolve()) in first["hashed"] and onnx
        assert first["reused"] == []

        async def kill_and_wait() -> dict[str, Any]:
            pid = engine.worker_pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            await until(lambda: engine.worker_pid not in (None, pid) and engine.state == "ready",
                        90, "a restarted worker to be ready")
            return engine.figures

        second = await kill_and_wait()
        assert second["hashed"] == []  # nothing read again
        assert set(first["hashed"]) <= set(second["reused"])
        rewrite_in_place(model)  # between starts: same bytes, same mtime, new ctime
        third = await kill_and_wait()
        assert third["hashed"] == [str(model.resolve())]
        assert onnx <= set(third["reused"])
    finally:
        await engine.close()
