#!/usr/bin/env python3
"""Soak: one session of a long meeting (default 60 minutes of audio), sent faster than real
time, through the daemon with the fake Google service and the tiny Sortformer.

The upstream rotates on audio time (every `--rotate-s` of audio, as it would in real time),
so an hour of audio rotates the Google call as often as a real hour would. Checks: every
scripted word delivered exactly once at its place on the session clock, every final word
labelled, no diarizer restart (so speaker numbers are one stream's, never renumbered), and
daemon and worker RSS flat (growth from the 25% mark to the end, in %). JSON out.

    python scripts/bench/soak.py --minutes 60 --speed 30
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script, too
from edge.client import stream_audio
from scripts.bench.harness import (
    KEY,
    daemon,
    diarizer_settings,
    emit,
    fake_google,
    metrics,
    wait_diarizer,
)
from tests.fakes.google_speech import ScriptWord, encode

SR = 16000
MAX_WORD_ID = 4000  # the fake's word code: id * 8 must fit in int16


def meeting(minutes: float) -> tuple[bytes, list[ScriptWord]]:
    """Utterances of 4 words (0.5 s each) with 0.6 s pauses, word ids cycling 1..4000."""
    segments: list[tuple[int, float]] = [(0, 0.6)]
    word = 0
    seconds = 0.6
    while seconds < minutes * 60:
        for _ in range(4):
            segments.append((word % MAX_WORD_ID + 1, 0.5))
            word += 1
        segments.append((0, 0.6))
        seconds += 4 * 0.5 + 0.6
    return encode(segments)


async def soak(minutes: float, speed: float, rotate_s: float) -> dict[str, Any]:
    audio, script = meeting(minutes)
    samples = np.frombuffer(audio, dtype="<i2")
    total_s = len(samples) / SR
    settings = {**diarizer_settings("tiny"), "EDGE_STT_ROTATE_S": str(rotate_s),
                "EDGE_DIARIZATION_MAX_BACKLOG_S": "120", "EDGE_DIARIZATION_MAX_RTF": "0",
                "EDGE_LABEL_WAIT_MS": "60000", "EDGE_IDLE_TIMEOUT_S": "600"}
    with fake_google() as endpoint, daemon(EDGE_STT_ENDPOINT=endpoint, EDGE_STT_INSECURE="true",
                                           **settings) as (pid, http, ws):
        diarizer = await wait_diarizer(http)
        if diarizer["state"] != "ready":
            raise RuntimeError(f"diarizer {diarizer['state']}: {diarizer['reason']}")
        daemon_proc = psutil.Process(pid)
        worker = next(p for p in daemon_proc.children() if "edge.diarization.worker" in " ".join(p.cmdline()))
        rss: list[tuple[float, float, float]] = []  # (audio s sent, daemon MB, worker MB)
        sent = {"s": 0.0}

        async def sampler() -> None:
            while True:
                await asyncio.sleep(1.0)
                rss.append((sent["s"], daemon_proc.memory_info().rss / 2**20,
                            worker.memory_info().rss / 2**20))

        sampling = asyncio.create_task(sampler())
        start = time.monotonic()
        stream = asyncio.create_task(stream_audio(ws, samples, SR, key=KEY, speed=speed))
        while not stream.done():
            await asyncio.sleep(0.5)
            sent["s"] = min(total_s, (time.monotonic() - start) * speed)
        result = stream.result()
        sampling.cancel()
        m = await metrics(http)
    words = [w for r in result.finals for w in r["channel"]["alternatives"][0]["words"]]
    exact = [w["word"] for w in words] == [s.text for s in script] and all(
        abs(w["start"] - s.start / SR) < 0.002 and abs(w["end"] - s.end / SR) < 0.002
        for w, s in zip(words, script, strict=False))
    speakers = [w["speaker"] for w in words]
    base = next((r for r in rss if r[0] >= total_s / 4), rss[0])

    def growth(i: int) -> dict[str, float]:  # 1: daemon, 2: worker
        return {"at_25pct": round(base[i], 1), "end": round(rss[-1][i], 1),
                "growth_pct": round(100 * (rss[-1][i] - base[i]) / base[i], 2)}

    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "audio_minutes": round(total_s / 60, 1),
        "wall_s": round(time.monotonic() - start, 1),
        "close": result.close_code,
        "words_scripted": len(script),
        "words_delivered": len(words),
        "words_exact": exact,
        "words_unlabelled": sum(s is None for s in speakers),
        "speakers_seen": sorted({s for s in speakers if s is not None}),
        "upstream_rotations": m.get('edge_upstream_restarts_total{cause="rotate"}', 0.0),
        "upstream_errors": sum(v for k, v in m.items() if k.startswith("edge_upstream_errors_total")),
        "diarizer_restarts": sum(v for k, v in m.items()
                                 if k.startswith("edge_diarizer_worker_restarts_total")),
        "diarizer_frames_skipped": m.get('edge_queue_dropped_total{queue="diarizer"}', 0.0),
        "rss_daemon_mb": growth(1),
        "rss_worker_mb": growth(2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=60)
    ap.add_argument("--speed", type=float, default=30, help="multiple of real time")
    ap.add_argument("--rotate-s", type=float, default=290, help="EDGE_STT_ROTATE_S")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    emit(asyncio.run(soak(args.minutes, args.speed, args.rotate_s)), args.out)


if __name__ == "__main__":
    main()
