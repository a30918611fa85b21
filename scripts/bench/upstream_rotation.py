#!/usr/bin/env python3
"""Upstream rotation benchmark: what rotating the Google stream costs, against the local fake.

A session of word-coded meeting audio (tests/fakes/google_speech.py: 4 words of 0.5 s, then a
pause) is fed in real time (`--speed`) through `create_upstream()` to the fake Speech service
over the official client, with calls rotated every `--rotate-s` seconds (production: 290 s).
The default, 15 s, leaves a 3 s quiet window (rotate_s / 5) that always holds a final, so
every rotation is the quiet kind (cut right after a final, short replay). `--rotate-s 5`
(1 s window, shorter than an utterance) forces most rotations at the limit instead: the
stress case, each replaying the utterance in progress. Measured:

- final latency: from the moment the audio that completes a final result was fed to the
  moment the session got the final, for the first final of every rotated call vs all others;
  `extra_ms` is the difference (mean, p95);
- call gap: from one call's end to the next call's start, on the service's clock (when the
  old call left nothing unfinalized the next opens with the next audio block, so up to one
  block later: that waits for audio, it does not delay it);
- replayed audio per rotation, and words lost / duplicated (every scripted word must arrive
  exactly once, at its place on the session clock).

    python scripts/bench/upstream_rotation.py                  # 180 s, real time, rotate 15 s
    python scripts/bench/upstream_rotation.py --faults 3       # plus UNAVAILABLE mid-stream
    python scripts/bench/upstream_rotation.py --rotate-s 5 --duration-s 60   # forced rotations

Prints one JSON object with the command line that made it.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import itertools
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from edge.clock import SAMPLE_RATE, AudioBlock  # noqa: E402
from edge.settings import load_settings  # noqa: E402
from edge.stt.base import StreamConfig  # noqa: E402
from edge.stt.google import create_upstream  # noqa: E402
from edge.stt.policy import Backoff  # noqa: E402
from scripts.bench.harness import emit  # noqa: E402
from tests.fakes.google_speech import encode, fake_speech, utterances  # noqa: E402


def summary(values: list[float]) -> dict[str, float | int]:
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    return {"n": len(values), "mean": round(statistics.fmean(values), 2),
            "p50": round(ordered[len(ordered) // 2], 2),
            "p95": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))], 2),
            "max": round(ordered[-1], 2)}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    period = 4 * 0.5 + args.gap_s
    pcm, script = encode(utterances(int(args.duration_s / period), words=4, word_s=0.5,
                                    gap_s=args.gap_s))
    total_s = len(pcm) / 2 / SAMPLE_RATE
    block = round(args.block_ms * SAMPLE_RATE / 1000)
    async with fake_speech() as (fake, endpoint):
        settings = load_settings(edge_stt_endpoint=endpoint, edge_stt_insecure=True,
                                 edge_stt_rotate_s=args.rotate_s, edge_stt_replay_s=30)
        upstream = await create_upstream(settings, backoff=Backoff(0.05, 1.0))
        assert upstream is not None
        if args.faults:
            step = int(total_s * 10 / (args.faults + 1))
            fake.faults.fail_at_requests = {step * (i + 1): grpc.StatusCode.UNAVAILABLE
                                            for i in range(args.faults)}
        loop = asyncio.get_running_loop()
        fed_end: list[int] = []  # session sample just past each block, and when it was fed
        fed_at: list[float] = []

        stream_run = upstream.open_run(StreamConfig(language="auto", model="chirp_3"))

        async def audio() -> None:
            t0 = loop.time()
            for pos in range(0, len(pcm) // 2, block):
                await asyncio.sleep(max(0.0, t0 + pos / SAMPLE_RATE / args.speed - loop.time()))
                piece = AudioBlock(pos, pcm[pos * 2:(pos + block) * 2])
                fed_end.append(piece.end)
                fed_at.append(loop.time())
                stream_run.push(piece)
            stream_run.end()

        finals: list[tuple[float, float, list[Any]]] = []  # (received, result end, words)
        started = time.monotonic()
        source = asyncio.create_task(audio())
        async for event in stream_run.events():
            if event.kind == "result" and event.is_final:
                finals.append((loop.time(), event.end, list(event.words)))
        await source
        wall_s = time.monotonic() - started
        await upstream.close()

    def fed_time(session_s: float) -> float:
        i = bisect.bisect_left(fed_end, round(session_s * SAMPLE_RATE))
        return fed_at[min(i, len(fed_at) - 1)]

    calls = fake.calls
    opened = [c.opened for c in calls]
    first_of_call: set[int] = set()
    seen_calls: set[int] = set()
    for n, (received, _, _) in enumerate(finals):
        call = bisect.bisect_right(opened, received) - 1
        if call > 0 and call not in seen_calls:
            first_of_call.add(n)
        seen_calls.add(call)
    latency = {"after_rotation": [], "baseline": []}  # type: dict[str, list[float]]
    for n, (received, end, _) in enumerate(finals):
        key = "after_rotation" if n in first_of_call else "baseline"
        latency[key].append((received - fed_time(end)) * 1000)
    words = [w for _, _, ws in finals for w in ws]
    got = [(w.word, round(w.start * SAMPLE_RATE), round(w.end * SAMPLE_RATE)) for w in words]
    want = [(w.text, w.start, w.end) for w in script]
    handover = [(b.opened - a.closed) * 1000 for a, b in itertools.pairwise(calls)
                if a.closed is not None]
    base, after = summary(latency["baseline"]), summary(latency["after_rotation"])
    return {
        "benchmark": "upstream_rotation",
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "grpcio": grpc.__version__},
        "audio_s": round(total_s, 2), "wall_s": round(wall_s, 2), "speed": args.speed,
        "rotate_s": args.rotate_s, "calls": len(calls),
        "call_outcomes": {o: sum(c.outcome == o for c in calls) for o in {c.outcome for c in calls}},
        "final_latency_ms": {"baseline": base, "after_rotation": after},
        "extra_ms": {k: round(after[k] - base[k], 2) for k in ("mean", "p95")
                     if k in after and k in base},
        "call_gap_ms": summary(handover),
        "replayed_s_per_call": round((sum(c.audio_s for c in calls) - total_s)
                                     / max(1, len(calls) - 1), 3),
        "words": {"scripted": len(want), "delivered": len(got),
                  "lost": len(set(want) - set(got)), "duplicated": len(got) - len(set(got)),
                  "exact": got == want},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration-s", type=float, default=180.0, help="audio length")
    p.add_argument("--speed", type=float, default=1.0, help="feed rate, x real time")
    p.add_argument("--rotate-s", type=float, default=15.0, help="EDGE_STT_ROTATE_S (>= 5)")
    p.add_argument("--gap-s", type=float, default=0.5, help="pause after each 2 s utterance")
    p.add_argument("--block-ms", type=float, default=100.0, help="session block size")
    p.add_argument("--faults", type=int, default=0, help="UNAVAILABLE faults to inject")
    emit(asyncio.run(run(p.parse_args())), None)


if __name__ == "__main__":
    main()
