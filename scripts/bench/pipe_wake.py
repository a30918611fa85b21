#!/usr/bin/env python3
"""What one message through a pipe to a sleeping process costs in CPU, on each side.

The decoder process (edge/decode_process.py) costs the daemon a pipe write per batch of
pieces and a read per reply; every write wakes the process at the other end. This measures
a round trip (a message of `--size` bytes there, 100 bytes back) between two processes, back
to back and with the sender sleeping `--gap` seconds between round trips (as paced clients
make the daemon do), in microseconds of CPU per round trip (user + system), per side.

    python scripts/bench/pipe_wake.py --size 1000,48000 --gap 0,0.004
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script, too
from scripts.bench.harness import emit


def round_trips(size: int, gap: float, count: int) -> dict[str, float]:
    there_r, there_w = os.pipe()
    back_r, back_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the echoing process: read a message, answer 100 bytes
        os.close(there_w)
        os.close(back_r)
        while True:
            got = os.read(there_r, 1 << 20)
            if not got:
                os._exit(0)
            os.write(back_w, b"y" * 100)
    os.close(there_r)
    os.close(back_w)
    message = b"x" * size
    cpu0 = time.process_time()
    wall0 = time.monotonic()
    for _ in range(count):
        os.write(there_w, message)
        got = 0
        while got < 100:
            got += len(os.read(back_r, 1 << 20))
        if gap:
            time.sleep(gap)
    cpu = time.process_time() - cpu0
    wall = time.monotonic() - wall0
    os.close(there_w)
    os.waitpid(pid, 0)
    child = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"size": size, "gap_s": gap, "round_trips": count,
            "sender_us": round(1e6 * cpu / count, 1),
            "echo_us": round(1e6 * (child.ru_utime + child.ru_stime) / count, 1),
            "wall_us": round(1e6 * wall / count, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1000,48000", help="bytes per message, comma-separated")
    ap.add_argument("--gap", default="0,0.004", help="seconds between round trips")
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rows: list[dict[str, Any]] = []
    for gap in (float(g) for g in args.gap.split(",")):
        for size in (int(s) for s in args.size.split(",")):
            # Each in its own child, so RUSAGE_CHILDREN counts one echo process at a time.
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(read)
                os.write(write, json.dumps(round_trips(size, gap, args.count)).encode())
                os._exit(0)
            os.close(write)
            text = b""
            while chunk := os.read(read, 65536):
                text += chunk
            os.waitpid(pid, 0)
            rows.append(json.loads(text))
    emit({"command": " ".join([Path(sys.executable).name, *sys.argv]),
          "machine": {"cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)},
          "unit": "us of CPU per round trip, each side", "rows": rows}, args.out)


if __name__ == "__main__":
    main()
