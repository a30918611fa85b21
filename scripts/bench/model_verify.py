#!/usr/bin/env python3
"""What checking the unpacked model on every start costs: `extract_model` reusing the unpacked
copy, which now hashes every file against the marker (issue 14, item 14), against the first
unpack; medians over runs. The page cache is warm after the first run (as on a device that
restarts the worker); `--drop-caches` (root) drops it before each timed run, as after a boot.

    python scripts/bench/model_verify.py --model full --runs 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script, too
from edge.diarization.model import extract_model
from edge.settings import Settings
from scripts.bench.harness import emit


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["tiny", "full"], default="full")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--drop-caches", action="store_true")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    from tests.fakes.sortformer import full_model_path, tiny_model_path

    model = full_model_path() if args.model == "full" else tiny_model_path()
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(_env_file=None, nemo_cache_dir=Path(tmp), nemo_diar_model_path=model)  # type: ignore[call-arg]
        t0 = time.perf_counter()
        folder = extract_model(model, settings)
        first = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        reuse = []
        for _ in range(args.runs):
            if args.drop_caches:
                Path("/proc/sys/vm/drop_caches").write_text("3\n")
            t0 = time.perf_counter()
            assert extract_model(model, settings) == folder
            reuse.append(time.perf_counter() - t0)
    emit({
        "command": " ".join(["python", *sys.argv]),
        "model": args.model, "unpacked_mb": round(size / 2**20, 1),
        "first_unpack_s": round(first, 3),
        "verified_reuse_s_median": round(statistics.median(reuse), 3),
        "verified_reuse_s": [round(x, 3) for x in reuse],
        "verify_mb_per_s": round(size / 2**20 / statistics.median(reuse), 1),
        "drop_caches": args.drop_caches,
    }, args.out)


if __name__ == "__main__":
    main()
