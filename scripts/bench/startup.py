#!/usr/bin/env python3
"""Start-up: time from exec to READY=1 (sd_notify, as systemd sees it) and the idle daemon's
RSS, over several runs; medians. With --diarizer tiny|full also the time until the diarizer
worker is ready and its RSS (it loads after READY, in its own process).

    python scripts/bench/startup.py --runs 5
    python scripts/bench/startup.py --runs 3 --diarizer full
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script, too
from scripts.bench.harness import daemon, diarizer_settings, emit, wait_diarizer


def one(diarizer: str | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "notify.sock"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(path))
        sock.settimeout(120)
        settings = {"NOTIFY_SOCKET": str(path), "STT_ENABLE_NEMO_DIARIZATION_FALLBACK": "false"}
        if diarizer:
            settings.update(diarizer_settings(diarizer))
        start = time.monotonic()
        try:
            with daemon(**settings) as (pid, http, _ws):
                while not sock.recv(4096).startswith(b"READY=1"):  # queued if sent already
                    pass
                out: dict[str, Any] = {"ready_s": round(time.monotonic() - start, 3)}
                if diarizer:
                    asyncio.run(wait_diarizer(http))
                    out["diarizer_ready_s"] = round(time.monotonic() - start, 2)
                    worker = psutil.Process(pid).children()[0]
                    out["worker_rss_mb"] = round(worker.memory_info().rss / 2**20, 1)
                time.sleep(2)
                out["daemon_rss_mb"] = round(psutil.Process(pid).memory_info().rss / 2**20, 1)
                return out
        finally:
            sock.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--diarizer", choices=["tiny", "full"])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    runs = [one(args.diarizer) for _ in range(args.runs)]
    medians = {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]}
    emit({"command": " ".join([Path(sys.executable).name, *sys.argv]), "median": medians,
          "runs": runs}, args.out)


if __name__ == "__main__":
    main()
