"""The diarizer worker process: owns the Sortformer model and every session's stream state.

Run by the engine as `python -I -c BOOT ROOT PARENT_PID` (`edge.diarization.process`), a fresh
interpreter (a spawn, never a fork of the daemon); `python -m edge.diarization.worker PARENT_PID`
runs the same by hand. Only this package imports NeMo, torch or onnxruntime, and only the
runtime it loads: on the onnx runtime (`edge.diarization.runtime`) neither torch nor NeMo is
imported. It reads `wire` frames on stdin and writes them on its original stdout; fd 1 is then
pointed at stderr, so whatever NeMo prints goes to the log and can never corrupt the protocol.

One thread, one message at a time, in arrival order: the steps of a session run in order, and
a hung step hangs only this process (the engine kills it). The worker dies with the daemon:
stdin reaching end of file ends it, and on Linux PR_SET_PDEATHSIG kills it if the daemon dies.

Test-only fault hook: `EDGE_DIARIZATION_FAULTS` (see `faults.Faults`, imported only when that
setting is given; never set it on a device).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from edge.clock import FRAME_S, SLOTS
from edge.diarization import wire
from edge.diarization.model import rss_bytes, trim_memory
from edge.diarization.wire import Kind

if TYPE_CHECKING:
    from edge.diarization.runtime import RuntimePlan
    from edge.diarization.worker.faults import Faults
    from edge.settings import Settings

log = logging.getLogger("edge.diarization.worker")
HEAVY_MODULES = ("torch", "nemo", "onnxruntime")
# What `_warm_up` measures by stepping the model, handed on to the next worker (READY `warmup`);
# `model_rss` is not among them: every worker measures its own.
WARMUP_FIGURES = ("step_peak", "session_bytes", "step_s", "step_max_s", "chunk_s", "rtf", "peak_exact")


def _peak_rss_bytes() -> int | None:
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def _reset_peak_rss() -> bool:
    # Linux >= 4.0: writing 5 resets VmHWM to the current RSS, so the next peak is the step's.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Worker:
    """The protocol loop's state: the model, the open streams, step timings."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self._lock = threading.Lock()
        self.diarizer: Any = None
        self.streams: dict[str, Any] = {}
        self.faults: Faults | None = None  # test-only (EDGE_DIARIZATION_FAULTS)
        self.step_times: list[tuple[float, int]] = []  # (seconds, frames) of the last 256 steps
        self.steps = 0

    def send(self, kind: Kind, meta: dict[str, Any] | None = None, array: np.ndarray | None = None) -> None:
        data = wire.encode(kind, meta, array)
        with self._lock:  # download progress may be reported from a downloader thread
            self.out.write(data)
            self.out.flush()

    def handle(self, msg: wire.Message) -> bool:
        """Act on one message. Returns False when the worker should exit."""
        m = msg.meta
        if msg.kind is Kind.AUDIO:
            self._audio(m["sid"], m["seq"], msg.array)
        elif msg.kind is Kind.OPEN:
            try:
                self.streams[m["sid"]] = self.diarizer.new_session()
            except Exception as exc:
                self.send(Kind.ERROR, {"sid": m["sid"], "seq": -1, "reason": _one_line(exc)})
        elif msg.kind is Kind.CLOSE:
            self._close(m["sid"])
        elif msg.kind is Kind.STATS:
            self.send(Kind.STATS_REPLY, self.stats())
        elif msg.kind is Kind.LOAD:
            return self._load(m["settings"], int(m.get("generation", 0)), m.get("digests"), m.get("warmup"))
        elif msg.kind is Kind.SHUTDOWN:
            return False
        else:
            raise wire.WireError(f"unexpected {msg.kind.name} from the daemon")
        return True

    def _audio(self, sid: str, seq: int, samples: np.ndarray | None) -> None:
        stream = self.streams.get(sid)
        if stream is None:
            self.send(Kind.ERROR, {"sid": sid, "seq": seq, "reason": "no such stream"})
            return
        try:
            if self.faults is not None:
                self.faults.before_step(sid.rpartition("/")[0])
            t0 = time.perf_counter()
            probs = stream.feed(np.asarray(samples, dtype=np.float32))
            dt = time.perf_counter() - t0
        except Exception as exc:
            # The stream's state may be half-updated: drop it; the engine opens a new one.
            self.streams.pop(sid, None)
            log.exception("step failed on %s", sid)
            self.send(Kind.ERROR, {"sid": sid, "seq": seq, "reason": _one_line(exc)})
            return
        if len(probs):
            self.steps += 1
            self.step_times = [*self.step_times[-255:], (dt, len(probs))]
        first = stream.frames_emitted - len(probs)
        self.send(Kind.FRAMES, {"sid": sid, "seq": seq, "first": first, "compute_s": dt}, probs)

    def _close(self, sid: str) -> None:
        stream = self.streams.pop(sid, None)
        if stream is None:
            self.send(Kind.CLOSED, {"sid": sid, "first": 0}, np.zeros((0, SLOTS), np.float32))
            return
        try:
            before = stream.frames_emitted
            probs = stream.finish()
            probs = np.zeros((0, SLOTS), np.float32) if probs is None else probs
        except Exception as exc:
            log.exception("finish failed on %s", sid)
            self.send(Kind.ERROR, {"sid": sid, "seq": -1, "reason": _one_line(exc)})
            probs, before = np.zeros((0, SLOTS), np.float32), 0
        self.send(Kind.CLOSED, {"sid": sid, "first": before}, probs)

    def stats(self) -> dict[str, Any]:
        times = [t for t, _ in self.step_times] or [0.0]
        audio_s = sum(n for _, n in self.step_times) * FRAME_S
        return {
            "rss": rss_bytes(), "streams": len(self.streams), "steps": self.steps,
            "step_median_s": statistics.median(times), "step_max_s": max(times),
            "rtf": sum(times) / audio_s if audio_s else None, "recent_steps": len(self.step_times),
            "state_bytes": sum(int(s.state_bytes()) for s in self.streams.values()),
            # Which heavy libraries this process has imported (the onnx runtime must show none
            # of torch / nemo); tests also read /proc/<pid>/maps for a mapped libtorch.
            "imported": sorted(name for name in HEAVY_MODULES if name in sys.modules),
        }

    # --- loading ---
    def _load(self, values: dict[str, Any], generation: int, digests: object = None,
              warmup: object = None) -> bool:
        """Load the model and send READY (or FATAL). `digests`: what an earlier worker of this
        daemon verified (its READY `digests`), trusted for files whose stat identity is
        unchanged (`DigestCache.seed`). `warmup`: that worker's READY `warmup`, whose figures
        are taken instead of stepping the model when its key is this load's (`warmup_key`).
        Returns False when the worker should exit (FATAL sent)."""
        from edge.diarization.digests import digest_report, seed_digests
        from edge.diarization.worker.loading import Phases
        from edge.settings import Settings

        phases = Phases()
        seed_digests(digests)

        try:
            settings = Settings(_env_file=None, **values)  # type: ignore[call-arg]
            if settings.edge_diarization_faults:
                from edge.diarization.worker.faults import Faults

                self.faults = Faults(settings.edge_diarization_faults, generation)
        except Exception as exc:  # the daemon validated them: this is a version skew or a bad fault rule
            self.send(Kind.FATAL, {"reason": f"worker cannot use the settings: {_one_line(exc)}"})
            return False
        self.send(Kind.PROGRESS, {"phase": "import", "done": 0, "total": 0})
        from edge.diarization.model import ModelUnavailable, resolve_model
        from edge.diarization.worker.loading import load_diarizer

        phases.mark("settings")
        try:
            def progress(done: int, total: int) -> None:
                self.send(Kind.PROGRESS, {"phase": "download", "done": done, "total": total})

            path = Path(resolve_model(settings, progress=progress))
            phases.mark("resolve")
            self.send(Kind.PROGRESS, {"phase": "load", "done": 0, "total": 0})
            params = settings.diarization_streaming_params()
            self.diarizer, device, plan = load_diarizer(settings, path, params, phases.mark)
            key = warmup_key(settings, path, plan, device, params)
            figures = reusable_warm_up(warmup, key)
            if figures is None:
                self.send(Kind.PROGRESS, {"phase": "warmup", "done": 0, "total": 0})
                figures = self._warm_up(params)
            else:  # the model's own memory is measured again: cheap, and what the budget rests on
                trim_memory()
                figures["model_rss"] = rss_bytes()
            phases.mark("warmup")
        except ModelUnavailable as exc:
            self.send(Kind.FATAL, {"reason": _one_line(exc)})
            return False
        except Exception as exc:
            log.exception("model load failed")
            self.send(Kind.FATAL, {"reason": f"model failed to load: {_one_line(exc)}"})
            return False
        reused = figures.pop("reused", False)
        log.info("loaded in %.2f s (%s; warm-up %s)", sum(phases.seconds.values()),
                 ", ".join(f"{k} {v:.2f} s" for k, v in phases.seconds.items()),
                 "reused" if reused else "measured")
        figures.update(device=device, model=path.name, pid=os.getpid(), runtime=plan.runtime,
                       precision=plan.precision, phases=phases.seconds, phases_cpu=phases.cpu_seconds,
                       warmup_reused=reused,
                       warmup={"key": key, "figures": {k: figures[k] for k in WARMUP_FIGURES}},
                       **digest_report())
        self.send(Kind.READY, figures)
        return True

    def _warm_up(self, params: dict[str, int]) -> dict[str, Any]:
        """Measure what admission needs: model RSS, one session's state, one step's cost."""
        trim_memory()
        model_rss = rss_bytes()
        exact_peak = _reset_peak_rss()
        stream = self.diarizer.new_session()
        chunk_s = params["chunk_len"] * FRAME_S
        piece = np.random.default_rng(0).normal(0, 0.1, 5120).astype(np.float32)  # 0.32 s
        # Steps run on full caches, as a session's do after its first ~25 s (on empty ones the
        # full model's step looked 3x cheaper and admission promised too much). Two kinds: a
        # plain step, and one whose FIFO overflows into the speaker cache, which is then
        # compressed (the costliest). The first step pays one-time costs (allocator growth,
        # lazy init) and is not counted; the best of each kind's two estimates what the
        # hardware can do, not how busy it was just then.
        times: dict[bool, list[float]] = {True: [], False: []}
        deadline = time.monotonic() + 120
        for i, overflow in enumerate((True, True, False, True, False)):
            while time.monotonic() < deadline:
                stream.fill_caches(seed=i, overflow=overflow)
                t0 = time.perf_counter()
                if len(stream.feed(piece)):
                    if self.faults is not None:
                        self.faults.warmup_step()
                    if i:
                        times[overflow].append(time.perf_counter() - t0)
                    break
        peak = _peak_rss_bytes() if exact_peak else None
        step_peak = max(0, (peak if peak is not None else rss_bytes()) - model_rss)
        stream.fill_caches()  # what a session holds once it has spoken for a while
        state = int(stream.state_bytes())
        stream.finish()
        del stream
        trim_memory()
        plain = min(times[False] or times[True] or [0.0])
        heavy = min(times[True] or [plain])
        # The FIFO overflows once per `spkcache_update_period` frames of audio (at most every
        # `fifo_len + chunk_len`, at least every step): the average step pays that share.
        period = min(params["spkcache_update_period"], params["fifo_len"] + params["chunk_len"])
        step_s = plain + max(0.0, heavy - plain) * min(1.0, params["chunk_len"] / max(1, period))
        return {
            "model_rss": model_rss, "step_peak": step_peak, "session_bytes": state,
            "step_s": step_s, "step_max_s": heavy, "chunk_s": chunk_s,
            "rtf": step_s / chunk_s if chunk_s else 0.0,
            "peak_exact": exact_peak,
        }


def warmup_key(settings: Settings, model: Path, plan: RuntimePlan, device: str,
               params: dict[str, int]) -> dict[str, Any]:
    """What the warm-up figures depend on: the checkpoint and (onnx) graph files by stat
    identity, the runtime and precision loaded, device, threads, speaker limit and streaming
    parameters, the heavy libraries' versions and the CPUs this process may use. JSON-plain, so
    it compares equal after the wire. Raises `OSError` if a file is gone."""
    from edge.diarization.digests import file_identity

    return {
        "model": file_identity(model),
        "graph": file_identity(plan.export.onnx) if plan.export is not None else None,
        "runtime": plan.runtime, "precision": plan.precision, "device": device,
        "threads": settings.edge_diarization_threads,
        "max_speakers": settings.stt_nemo_diarization_max_speakers, "params": dict(params),
        "versions": {name: str(getattr(sys.modules[name], "__version__", "?"))
                     for name in HEAVY_MODULES if name in sys.modules},
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }


def reusable_warm_up(prior: object, key: dict[str, Any]) -> dict[str, Any] | None:
    """The warm-up figures of `prior` (an earlier READY's `warmup`: {key, figures}) when its key
    equals `key` and it holds every one of `WARMUP_FIGURES` as a non-negative number, with
    `reused: True`; else None (measure again)."""
    if not isinstance(prior, dict) or prior.get("key") != key or not isinstance(prior.get("figures"), dict):
        return None
    figures = {k: prior["figures"].get(k) for k in WARMUP_FIGURES}
    if not all(isinstance(v, int | float) and v >= 0 for v in figures.values()):
        return None
    return {**figures, "reused": True}


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]


def die_with_parent(parent: int | None) -> None:
    """Be killed when the daemon `parent` dies (Linux PR_SET_PDEATHSIG); exit now if it
    already has."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if parent is not None and os.getppid() != parent:  # the daemon died before prctl
        os._exit(1)


def start_worker(argv: list[str] | None, name: str) -> int:
    """What a worker process (this one, or the decoder process) does first: die with the
    daemon (`argv[0]`, default `sys.argv[1]`, is its pid), keep the original stdout for the
    protocol and point fd 1 at stderr, and log to stderr as `name`. Returns the protocol's fd."""
    argv = sys.argv[1:] if argv is None else argv
    die_with_parent(int(argv[0]) if argv else None)
    out_fd = os.dup(1)
    os.dup2(2, 1)  # stray prints (NeMo's) go to stderr, never into the protocol
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"{name} %(process)d: %(levelname)s %(message)s")
    return out_fd


def main(argv: list[str] | None = None) -> int:
    """Serve the protocol on stdin/stdout until SHUTDOWN or end of input. Returns the exit code."""
    out = os.fdopen(start_worker(argv, "diarizer worker"), "wb")
    worker = Worker(out)
    worker.send(Kind.HELLO, {"version": wire.VERSION, "pid": os.getpid()})
    read = sys.stdin.buffer.read
    try:
        while (msg := wire.read_message(read)) is not None:
            if not worker.handle(msg):
                break
    except (BrokenPipeError, wire.WireError) as exc:
        log.error("protocol ended: %s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
