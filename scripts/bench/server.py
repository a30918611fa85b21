#!/usr/bin/env python3
"""Server load: N concurrent real-time sessions (16 kHz linear16, 100 ms frames) against the
daemon with the fake Google service, ramping N until a limit breaks.

Three processes: the fake Google service, the daemon (measured), and this load generator.
Per N it reports the daemon's CPU per stream (its child processes' included: the decoder
process), event-loop lag p50/p99 (measured inside the
daemon: /metrics), final-result latency p50/p99 (the audio of a final's last word sent ->
that Results received, on the client), RSS, and errors. A step "breaks" when loop lag p99
reaches 20 ms, latency p99 exceeds 2 s over the fake's endpointing delay, or a session fails.

    python scripts/bench/server.py --ramp 25,50,100,150,200,250 --seconds 20
    python scripts/bench/server.py --diarizer tiny --ramp 1,2,4,8 --seconds 20
    python scripts/bench/server.py --formats linear16,webm-opus --ramp 4,8 --seconds 15

`--formats linear16,webm-opus` runs, at every N, a step of each format one after the other
on the same daemon: browser-style webm/opus (made by ffmpeg from the same signal, sent as
250 ms pieces without `encoding`) against 16 kHz linear16; `comparison` gives the CPU ratio.
The step that runs second on a daemon costs more (~10 % at 64 streams, measured both ways), so
`--rounds 2` runs each N's formats in order, then reversed, and the ratio is the median of the
ratios paired within each round.
With webm-opus in the run every format carries tone-coded words (the fake's `tone` code,
which survives Opus), so words lost are counted the same way for both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script, too
from edge.client import StreamResult, stream_audio, stream_encoded, timed_pieces
from scripts.bench.harness import (
    FAKE_ENDPOINT_S,
    KEY,
    daemon,
    diarizer_settings,
    emit,
    fake_google,
    metrics,
    wait_diarizer,
)
from tests.fakes.google_speech import encode, tone_encode, utterances

SR = 16000
FULL_GC = 'edge_gc_pause_seconds_bucket{generation="2",le="'


def latencies(result: StreamResult) -> list[float]:
    out = []
    for msg, at in zip(result.messages, result.received_at, strict=True):
        if msg.get("type") != "Results" or not msg.get("is_final"):
            continue
        words = msg["channel"]["alternatives"][0]["words"]
        if words:
            sent = result.sent_time(words[-1]["end"])
            if sent is not None:
                out.append(at - sent)
    return out


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(len(ordered) * q))], 4)


FORMATS = ("linear16", "webm-opus")


def tone_signal(seconds: float) -> tuple[np.ndarray, bytes, int]:
    """Tone-coded utterances (word ids cycling 1-10, tones under 3 kHz): 16 kHz int16
    samples, the same signal as webm/opus (ffmpeg, libopus 32 kb/s from 48 kHz), and the
    number of words."""
    segments = [(1 + (i - 1) % 10 if i else 0, s)
                for i, s in utterances(max(1, int(seconds / 2.6)), words=4)]
    audio16, script = tone_encode(segments, SR)
    audio48, _ = tone_encode(segments, 48000)
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "src.f32", Path(tmp) / "out.webm"
        src.write_bytes(audio48.astype("<f4").tobytes())
        subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-f", "f32le", "-ar",
                        "48000", "-ac", "1", "-i", str(src), "-c:a", "libopus", "-b:a", "32k",
                        "-f", "webm", str(out)], check=True)
        webm = out.read_bytes()
    pcm = np.clip(np.rint(audio16 * 32768), -32768, 32767).astype(np.int16)
    return pcm, webm, len(script)


def children_cpu(proc: psutil.Process) -> dict[int, float]:
    """User + system CPU seconds of each live child process of `proc`, by pid."""
    out = {}
    for child in proc.children(recursive=True):
        try:
            t = child.cpu_times()
        except psutil.NoSuchProcess:
            continue
        out[child.pid] = t.user + t.system
    return out


async def step(n: int, seconds: float, ws: str, http: str, pid: int, query: dict[str, Any],
               fmt: str = "linear16", tone: bool = False) -> dict[str, Any]:
    if tone:
        samples, webm, words = tone_signal(seconds)
    else:
        audio, script = encode(utterances(max(1, int(seconds / 2.6)), words=4))
        samples, webm, words = np.frombuffer(audio, dtype="<i2"), b"", len(script)
    audio_s = len(samples) / SR
    pieces = timed_pieces(webm, 0.25) if webm else []
    proc = psutil.Process(pid)
    cpu0 = proc.cpu_times()
    kids0 = children_cpu(proc)
    t0 = time.monotonic()
    lag_samples: list[tuple[float, float]] = []
    rss_peak = 0

    async def sampler() -> None:
        nonlocal rss_peak
        while True:
            await asyncio.sleep(1.0)
            m = await metrics(http)
            lag_samples.append((m["edge_event_loop_lag_p50_seconds"],
                                m["edge_event_loop_lag_p99_seconds"]))
            rss_peak = max(rss_peak, proc.memory_info().rss)

    async def one(i: int) -> StreamResult | BaseException:
        await asyncio.sleep(i * 0.1 / max(1, n / 10))  # stagger starts over ~1 s per 10
        try:
            if fmt == "webm-opus":
                return await stream_encoded(ws, pieces, key=KEY, query=query)
            return await stream_audio(ws, samples, SR, key=KEY, query=query)
        except Exception as exc:  # recorded as an error of this step
            return exc

    gc0 = await metrics(http)
    sampling = asyncio.create_task(sampler())
    results = await asyncio.gather(*(one(i) for i in range(n)))
    sampling.cancel()
    wall = time.monotonic() - t0
    cpu1 = proc.cpu_times()
    kids1 = children_cpu(proc)
    gc1 = await metrics(http)
    gc_full = {k: gc1[k] - gc0.get(k, 0.0) for k in gc1
               if k.startswith('edge_gc_pause_seconds_bucket{generation="2"')}
    # The daemon's CPU includes its children's (the decoder process; the diarizer worker).
    kids = sum(t - kids0.get(child, 0.0) for child, t in kids1.items())
    cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system) + kids
    ok = [r for r in results if isinstance(r, StreamResult) and r.close_code == 1000]
    lost = sum(words - sum(len(m["channel"]["alternatives"][0]["words"]) for m in r.finals)
               for r in ok)
    lat = [x for r in ok for x in latencies(r)]
    steady = lag_samples[2:-1] or lag_samples  # skip ramp-up and tail
    unlabelled = sum(1 for r in ok for m in r.finals for w in m["channel"]["alternatives"][0]["words"]
                     if w.get("speaker") is None)
    return {
        "format": fmt,
        "streams": n,
        "ok": len(ok),
        "errors": [repr(r)[:200] for r in results if not isinstance(r, StreamResult)][:3]
                  + [f"close {r.close_code} {r.close_reason}" for r in results
                     if isinstance(r, StreamResult) and r.close_code != 1000][:3],
        "audio_s_per_stream": round(audio_s, 1),
        "cpu_s_per_stream_s": round(cpu / wall / n, 5),
        "cpu_cores": round(cpu / wall, 3),
        "cpu_cores_children": round(kids / wall, 3),
        "loop_lag_p50_ms": round(1000 * statistics.median(s[0] for s in steady), 2) if steady else None,
        "loop_lag_p99_ms": round(1000 * max(s[1] for s in steady), 2) if steady else None,
        "final_latency_p50_s": pct(lat, 0.5),
        "final_latency_p99_s": pct(lat, 0.99),
        "words_lost": lost,
        "words_unlabelled": unlabelled,
        "rss_peak_mb": round(rss_peak / 2**20, 1),
        "full_gc_pauses_over_10ms": round(gc_full.get(f"{FULL_GC}+Inf\"}}", 0)
                                          - gc_full.get(f"{FULL_GC}0.01\"}}", 0)),
        "load_avg_1m": round(os.getloadavg()[0], 2),  # other work on the machine meanwhile
    }


def broken(r: dict[str, Any]) -> str | None:
    if r["ok"] < r["streams"]:
        return "sessions failed"
    if r["loop_lag_p99_ms"] is not None and r["loop_lag_p99_ms"] >= 20:
        return "loop lag p99 >= 20 ms"
    if r["final_latency_p99_s"] is not None and r["final_latency_p99_s"] > FAKE_ENDPOINT_S + 2.0:
        return "final latency p99 > endpointing + 2 s"
    if r["words_lost"]:
        return "words lost"
    return None


async def run(args: argparse.Namespace) -> dict[str, Any]:
    ramp = [int(x) for x in args.ramp.split(",")]
    query = {"diarize": True} if args.diarizer else {"diarize": False}
    settings = {"EDGE_MAX_SESSIONS": str(max(ramp) + 10), "EDGE_DECODER": args.decoder,
                "STT_ENABLE_NEMO_DIARIZATION_FALLBACK": "false"}
    if args.diarizer:
        settings.update(diarizer_settings(args.diarizer))
    formats = args.formats.split(",")
    if unknown := set(formats) - set(FORMATS):
        raise SystemExit(f"--formats: unknown {sorted(unknown)}; allowed: {', '.join(FORMATS)}")
    tone = "webm-opus" in formats
    if tone and shutil.which("ffmpeg") is None:
        raise SystemExit("--formats webm-opus needs ffmpeg to make the audio (apt-get install ffmpeg)")
    with fake_google(word_code="tone" if tone else "exact") as endpoint, daemon(
            EDGE_STT_ENDPOINT=endpoint, EDGE_STT_INSECURE="true", **settings) as (pid, http, ws):
        diarizer = await wait_diarizer(http) if args.diarizer else None
        idle_rss = psutil.Process(pid).memory_info().rss / 2**20
        steps = []
        for n in ramp:
            stop = False
            for k in range(args.rounds):
                for fmt in formats if k % 2 == 0 else formats[::-1]:
                    r = await step(n, args.seconds, ws, http, pid, query, fmt, tone)
                    r["round"] = k
                    r["broken"] = broken(r)
                    steps.append(r)
                    print(json.dumps(r), file=sys.stderr, flush=True)
                    stop = stop or bool(r["broken"])
                    await asyncio.sleep(2)
            if stop and not args.keep_going:
                break
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg()},
        "diarizer": args.diarizer, "diarizer_status": diarizer,
        "daemon_idle_rss_mb": round(idle_rss, 1),
        "steps": steps,
        "comparison": compare(steps, formats),
    }


def compare(steps: list[dict[str, Any]], formats: list[str]) -> list[dict[str, Any]]:
    """Per N: each format's CPU per stream relative to the first format's (linear16), paired
    within each round; the median over rounds, and every round's ratio."""
    out = []
    base = formats[0]
    for n in sorted({s["streams"] for s in steps}):
        ratios: dict[str, list[float]] = {fmt: [] for fmt in formats[1:]}
        for k in sorted({s.get("round", 0) for s in steps if s["streams"] == n}):
            at = {s["format"]: s for s in steps if s["streams"] == n and s.get("round", 0) == k}
            if base not in at or not at[base]["cpu_s_per_stream_s"]:
                continue
            for fmt in ratios:
                if fmt in at:
                    ratios[fmt].append(at[fmt]["cpu_s_per_stream_s"] / at[base]["cpu_s_per_stream_s"])
        row: dict[str, Any] = {"streams": n}
        for fmt, got in ratios.items():
            if got:
                row[f"cpu_ratio_{fmt}_vs_{base}"] = round(statistics.median(got), 3)
                row[f"cpu_ratio_{fmt}_vs_{base}_per_round"] = [round(x, 3) for x in got]
        if len(row) > 1:
            out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ramp", default="25,50,100,150,200,250")
    ap.add_argument("--seconds", type=float, default=20.0, help="audio per session per step")
    ap.add_argument("--diarizer", choices=["tiny", "full"], help="also run the local diarizer")
    ap.add_argument("--formats", default="linear16",
                    help=f"comma-separated, each run at every N: {', '.join(FORMATS)}")
    ap.add_argument("--keep-going", action="store_true", help="run every step even after a break")
    ap.add_argument("--rounds", type=int, default=1,
                    help="runs of each N's formats, in order then reversed (2: ABBA)")
    ap.add_argument("--decoder", choices=["process", "thread"], default="process",
                    help="EDGE_DECODER: where webm/opus is decoded")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    emit(asyncio.run(run(args)), args.out)


if __name__ == "__main__":
    main()
