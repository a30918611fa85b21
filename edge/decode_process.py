"""Compressed audio decoded in a separate process, one for all of the daemon's sessions.

`DecoderProcess` (daemon side) hands out `RemoteDecoder`s, which `SessionAudio` uses exactly as
it would a `StreamDecoder` (the `Decoder` protocol of edge/formats.py); each forwards its
client's bytes to the decoder process and returns the `Pcm` they completed, already resampled
to the session clock's 16 kHz (every channel kept: the daemon mixes them). In the decoder
process, `main()` runs one asyncio loop and one `InlineDecoder` (edge/decode.py: the same PyAV
demuxer and decoder as `StreamDecoder`, hosted in a greenlet instead of a thread) per stream.

Why a process. Every FFmpeg call PyAV makes releases the GIL and takes it back; when the loop
runs Python meanwhile, each take is contended, so in the daemon the loop waited for each
piece's decode blocking (HANDOFF_WAIT_S in edge/decode.py), and at 64 and more WebM/Opus
streams that waiting pushed the loop's lag p99 over 20 ms for every session, linear16 ones
included. Here the decoder's loop waits instead, on the other core, and the daemon's loop only
writes bytes to a pipe and reads PCM back. It also keeps FFmpeg's crashes out of the daemon:
a decoder that segfaults on a hostile stream ends the compressed sessions in it (`DecoderLost`,
below), not the daemon and every linear16 room with it.

Started at the first compressed session (a room that only sends linear16 never pays for it:
70 MB, plus ~2 MB per stream), then kept. The protocol is edge/diarization/wire.py's (OPEN,
BYTES, END, CLOSE; PCM, DECODED, ERROR), spawned like the diarizer worker (`WorkerProcess`:
isolated, a minimal environment, oom_score_adj 1000, dies with the daemon).

Bounds and failure policy:
- One request in flight per stream: `SessionAudio` awaits each feed before the next (the
  receive loop's backpressure, as before), so what the pipes hold is at most one client frame
  and its PCM per session. The decoder process decodes each request as it reads it: it
  queues nothing.
- A stream the decoder cannot decode: ERROR {reason} -> `DecodeError` (the session answers
  DATA-0000 and closes 1008); the other streams go on.
- The decoder process dies (a crash, the OOM killer, a kill): every stream open in it gets
  `DecoderLost` naming the exit (the session sends the finals for the audio decoded before
  it, then closes 1011: which stream's bytes crashed it cannot be told, so none is called
  undecodable); the next compressed session starts a new process.
- No answer within a stream's decode budget plus `HUNG_GRACE_S`: the process as a whole is
  stuck (a slow chunk alone is cut off inside it, by `InlineDecoder`, at FFmpeg's next read),
  so it is killed, with the consequences above.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import soxr

from edge.audio import resampler
from edge.clock import SAMPLE_RATE
from edge.decode import FEED_TIMEOUT_S, MAX_BYTES_WITHOUT_AUDIO, InlineDecoder
from edge.diarization import wire
from edge.diarization.process import WorkerProcess, receive
from edge.diarization.wire import Kind
from edge.formats import FORMAT_NAMES, DecodeError, DecoderLost, Pcm

if TYPE_CHECKING:
    from edge.metrics import Metrics

log = logging.getLogger("edge.decode_process")

HUNG_GRACE_S = 2.0  # over a stream's decode budget before the whole process counts as stuck
STOP_GRACE_S = 2.0  # at shutdown, before the decoder process is killed
# How long the daemon gathers frames for the decoder process before one write: at 64 streams
# it cut 6 % of the CPU (`scripts/bench/decode.py --paced 64`), for at most 10 ms more on the
# way to the words (the decoder answers each batch in one write, at once).
BATCH_S = 0.010


# --- daemon side ----------------------------------------------------------------------------


class Corked:
    """Frames gathered for `delay_s` (0: the rest of this turn of the event loop), then sent
    as one write.

    Every write to a pipe wakes the process at the other end, and on this VM that costs 65-120
    us of CPU on each side per round trip (`scripts/bench/pipe_wake.py`; 126 us per write in
    the daemon's profile at 64 paced streams): frames of many streams go as one.
    """

    def __init__(self, write: Callable[[bytes], object], delay_s: float = 0.0) -> None:
        self._write = write
        self._delay_s = delay_s
        self._frames: list[bytes] = []

    def __call__(self, frame: bytes) -> None:
        if not self._frames:
            loop = asyncio.get_running_loop()
            if self._delay_s:
                loop.call_later(self._delay_s, self.flush)
            else:
                loop.call_soon(self.flush)
        self._frames.append(frame)

    def flush(self) -> None:
        if self._frames:
            frames, self._frames = self._frames, []
            self._write(b"".join(frames))


class DecoderProcess:
    """The daemon's decoder process: started by the first `RemoteDecoder` that needs it,
    restarted by the first one after it exits, stopped by `close()`.

    `decoder(...)` takes `StreamDecoder`'s arguments and returns a `RemoteDecoder`."""

    def __init__(self, env: dict[str, str] | None = None, metrics: Metrics | None = None) -> None:
        self._env = env
        self._metrics = metrics
        self._kills: dict[WorkerProcess, str] = {}  # why we killed it: its exit's cause
        self._worker: WorkerProcess | None = None
        self._out: Corked | None = None  # to the running worker
        self._streams: dict[str, RemoteDecoder] = {}
        self._starting = asyncio.Lock()
        self._sids = itertools.count()
        self._readers: set[asyncio.Task[None]] = set()
        self._closed = False
        self.starts = 0

    @property
    def pid(self) -> int | None:
        """The running decoder process's pid (None when none runs)."""
        return self._worker.pid if self._worker is not None else None

    def decoder(self, fmt: str, *, packets: bool = False, rate: int | None = None,
                channels: int = 1, feed_timeout_s: float = FEED_TIMEOUT_S,
                max_bytes_without_audio: int = MAX_BYTES_WITHOUT_AUDIO) -> RemoteDecoder:
        """A decoder for one stream in `fmt` (see `StreamDecoder`); nothing starts until its
        first `feed`."""
        options = {"format": fmt, "packets": packets, "rate": rate, "channels": channels,
                   "timeout_s": feed_timeout_s, "max_bytes": max_bytes_without_audio}
        return RemoteDecoder(self, fmt, options, feed_timeout_s)

    async def start(self) -> int:
        """Start the decoder process now if none runs (it otherwise starts at the first
        feed); returns its pid. Raises DecoderLost if it cannot start."""
        return (await self._running()).pid

    async def close(self) -> None:
        """Stop the decoder process (after the sessions drained): end of input, then a kill
        after `STOP_GRACE_S`. Idempotent."""
        self._closed = True
        if self._worker is not None:
            if self._out is not None:
                self._out.flush()
            await self._worker.stop(STOP_GRACE_S)
        await asyncio.gather(*self._readers, return_exceptions=True)

    async def _attach(self, decoder: RemoteDecoder) -> tuple[WorkerProcess, str]:
        """Open `decoder`'s stream in the running process (started if none). Raises
        DecoderLost when the process cannot start or the daemon is stopping."""
        worker = await self._running()
        sid = str(next(self._sids))
        self._streams[sid] = decoder
        self._send(worker, Kind.OPEN, {"sid": sid, **decoder.options})
        return worker, sid

    def _send(self, worker: WorkerProcess, kind: Kind, meta: dict[str, Any],
              data: bytes | None = None) -> bool:
        """Queue a frame for `worker`; False if it is no longer the running one."""
        if worker is not self._worker or self._out is None or worker.returncode is not None:
            return False
        self._out(wire.encode(kind, meta, data=data))
        return True

    async def _running(self) -> WorkerProcess:
        async with self._starting:
            if self._worker is None:
                if self._closed:
                    raise DecoderLost("the daemon is stopping: no new decoder")
                try:
                    worker = await WorkerProcess.spawn(self._env, entry=__name__)
                except OSError as exc:
                    log.error("cannot start the decoder process: %s", exc)
                    raise DecoderLost(f"the decoder process cannot start ({exc})") from None
                self._worker = worker
                self._out = Corked(worker.write, BATCH_S)
                self.starts += 1
                task = asyncio.create_task(self._read(worker), name=f"decoder-{worker.pid}")
                self._readers.add(task)
                task.add_done_callback(self._readers.discard)
                log.info("decoder process %d started", worker.pid)
            return self._worker

    def _forget(self, sid: str) -> None:
        self._streams.pop(sid, None)

    def _kill(self, worker: WorkerProcess, cause: str, why: str) -> None:
        log.error("decoder process %d %s: killing it, with its %d open stream(s)",
                  worker.pid, why, sum(1 for s in self._streams.values() if s.worker is worker))
        self._kills.setdefault(worker, cause)
        worker.kill()

    async def _read(self, worker: WorkerProcess) -> None:
        """Route `worker`'s replies to their streams until it exits; then fail the streams
        it still had."""
        try:
            while (msg := await worker.recv()) is not None:
                stream = self._streams.get(msg.meta.get("sid", ""))
                if stream is not None and stream.worker is worker:
                    stream.on_reply(msg)
        except wire.WireError as exc:
            self._kill(worker, "protocol", f"broke the protocol ({exc})")
        code = await worker.wait()
        cause = self._kills.pop(worker, "crash")
        if self._worker is worker:
            self._worker, self._out = None, None
        lost = [s for s in self._streams.values() if s.worker is worker]
        how = f"signal {-code}" if code < 0 else f"code {code}"
        for stream in lost:
            stream.fail(DecoderLost(f"the decoder process exited ({how}) while decoding "
                                    "this stream"))
        if lost or not self._closed:
            log.warning("decoder process %d exited (%s) with %d open stream(s)",
                        worker.pid, how, len(lost))
            if self._metrics is not None:
                self._metrics.decoder_exits.labels(cause).inc()


class RemoteDecoder:
    """One stream decoded in the decoder process: `await feed(chunk)` -> the Pcm it completed
    (the `Decoder` protocol). Raises DecodeError as `StreamDecoder` does, and DecoderLost when
    the process dies, hangs or cannot start."""

    def __init__(self, owner: DecoderProcess, fmt: str, options: dict[str, Any],
                 feed_timeout_s: float) -> None:
        self.name = FORMAT_NAMES.get(fmt, fmt)
        self.codec: str | None = None
        self.decoded_samples = 0
        self.options = options
        self.worker: WorkerProcess | None = None
        self._owner = owner
        self._sid = ""
        self._budget_s = feed_timeout_s + HUNG_GRACE_S
        self._reply: asyncio.Future[list[Pcm]] | None = None
        self._pcm: list[Pcm] = []
        self._error: DecodeError | None = None
        self._closed = False

    async def feed(self, data: bytes) -> list[Pcm]:
        """Decode `data`; returns the audio it completed. Raises DecodeError."""
        return await self._ask(Kind.BYTES, data)

    async def finish(self) -> list[Pcm]:
        """End of input: the decoder's tail. Raises DecodeError."""
        return await self._ask(Kind.END, None)

    def close(self) -> None:
        """Free the stream in the decoder process (idempotent; never blocks)."""
        if self._closed:
            return
        self._closed = True
        if self.worker is not None:
            self._owner._send(self.worker, Kind.CLOSE, {"sid": self._sid})
            self._owner._forget(self._sid)

    async def _ask(self, kind: Kind, data: bytes | None) -> list[Pcm]:
        if self._error is not None:
            raise self._error
        if self._closed:
            raise DecodeError(f"the {self.name} decoder is closed")
        if self._reply is not None:
            raise RuntimeError("RemoteDecoder: one request at a time")
        if self.worker is None:
            self.worker, self._sid = await self._owner._attach(self)
        self._pcm = []
        reply = self._reply = asyncio.get_running_loop().create_future()
        try:
            if not self._owner._send(self.worker, kind, {"sid": self._sid}, data=data):
                self._error = DecoderLost("the decoder process is gone")
                raise self._error
            async with asyncio.timeout(self._budget_s):
                return await reply
        except TimeoutError:
            self._owner._kill(self.worker, "hung", f"did not answer in {self._budget_s:g} s")
            self._error = DecoderLost(f"the decoder process did not answer in {self._budget_s:g} s")
            raise self._error from None
        except asyncio.CancelledError:
            # The reply would answer the next request: this stream cannot go on.
            self._error = DecodeError(f"the {self.name} decoder was cancelled mid-request")
            self.close()
            raise
        finally:
            self._reply = None

    def on_reply(self, msg: wire.Message) -> None:
        """One reply frame from the decoder process (PCM, DECODED or ERROR)."""
        reply = self._reply
        if msg.kind is Kind.PCM and msg.array is not None:
            samples = msg.array
            self._pcm.append(Pcm(samples, int(msg.meta["rate"])))
            self.decoded_samples += len(samples)
        elif msg.kind is Kind.DECODED:
            self.codec = msg.meta.get("codec")
            if reply is not None and not reply.done():
                reply.set_result(self._pcm)
        elif msg.kind is Kind.ERROR:
            self.fail(DecodeError(str(msg.meta.get("reason", "decode failed"))))

    def fail(self, error: DecodeError) -> None:
        """End the stream with `error` (raised by the request in flight, and every later one)."""
        self._error = error
        if self._reply is not None and not self._reply.done():
            self._reply.set_exception(error)


# --- the decoder process ----------------------------------------------------------------------


class _Stream:
    def __init__(self, decoder: InlineDecoder) -> None:
        self.decoder = decoder
        self._layout: tuple[int, int] | None = None  # (rate, channels) the resampler is for
        self._resampler: soxr.ResampleStream | None = None

    def to_clock(self, parts: list[Pcm], last: bool) -> list[Pcm]:
        """Decoded audio -> the session clock's rate, every channel kept (the daemon mixes
        them): a third of the bytes of 48 kHz to send back, resampled by `SessionAudio`'s
        resampler. `last`: the end of input (the resampler's tail)."""
        out = []
        for part in parts:
            layout = (part.rate, part.samples.shape[1])
            if layout != self._layout:  # the first audio, or a new rate mid-stream
                out += self._tail()
                self._layout, self._resampler = layout, resampler(*layout)
            if self._resampler is None:
                out.append(part)
            else:
                out.append(Pcm(self._resampler.resample_chunk(part.samples), SAMPLE_RATE))
        if last:
            out += self._tail()
        return [p for p in out if len(p.samples)]

    def _tail(self) -> list[Pcm]:
        if self._resampler is None or self._layout is None:
            return []
        empty = np.zeros((0, self._layout[1]), np.float32)
        return [Pcm(self._resampler.resample_chunk(empty, last=True), SAMPLE_RATE)]


class DecoderServer:
    """The decoder process's side: one `InlineDecoder` per open stream. Requests are decoded
    as they are read, in order, on the loop (a decode never waits for anything else);
    replies go to `write` (never blocks)."""

    def __init__(self, write: Callable[[bytes], None]) -> None:
        self._write = write
        self._streams: dict[str, _Stream] = {}

    def handle(self, msg: wire.Message) -> bool:
        """Act on one frame from the daemon. Returns False at SHUTDOWN. Raises
        `wire.WireError` for a kind the daemon does not send."""
        sid = str(msg.meta.get("sid", ""))
        if msg.kind is Kind.OPEN:
            self._open(sid, msg.meta)
        elif msg.kind in (Kind.BYTES, Kind.END):
            stream = self._streams.get(sid)
            if stream is not None:  # else ended by an error: the daemon's CLOSE is on its way
                self._decode(sid, stream, msg.data if msg.kind is Kind.BYTES else None)
        elif msg.kind is Kind.CLOSE:
            self._drop(sid)
        elif msg.kind is Kind.SHUTDOWN:
            return False
        else:
            raise wire.WireError(f"the decoder process does not take {msg.kind.name}")
        return True

    def close(self) -> None:
        """Stop every stream (the process is ending)."""
        for sid in list(self._streams):
            self._drop(sid)

    def _open(self, sid: str, meta: dict[str, Any]) -> None:
        try:
            decoder = InlineDecoder(
                str(meta["format"]), packets=bool(meta["packets"]), rate=meta["rate"],
                channels=int(meta["channels"]), feed_timeout_s=float(meta["timeout_s"]),
                max_bytes_without_audio=int(meta["max_bytes"]))
        except (KeyError, TypeError, ValueError) as exc:
            self._send(Kind.ERROR, {"sid": sid, "reason": f"bad OPEN: {exc!r}"})
            return
        self._streams[sid] = _Stream(decoder)

    def _decode(self, sid: str, stream: _Stream, data: bytes | None) -> None:
        """Decode one chunk (None: the end of input) and write the reply."""
        try:
            out = stream.to_clock(stream.decoder.decode(data), last=data is None)
        except DecodeError as exc:
            self._fail(sid, str(exc))
            return
        except Exception as exc:  # a PyAV or numpy bug: this stream ends, the rest go on
            log.exception("stream %s failed", sid)
            self._fail(sid, f"internal decoder error ({type(exc).__name__})")
            return
        for part in out:
            self._write(wire.encode(Kind.PCM, {"sid": sid, "rate": part.rate}, part.samples))
        self._write(wire.encode(Kind.DECODED, {"sid": sid, "codec": stream.decoder.codec}))

    def _fail(self, sid: str, reason: str) -> None:
        self._send(Kind.ERROR, {"sid": sid, "reason": reason})
        self._drop(sid)

    def _drop(self, sid: str) -> None:
        stream = self._streams.pop(sid, None)
        if stream is not None:
            stream.decoder.close()

    def _send(self, kind: Kind, meta: dict[str, Any]) -> None:
        self._write(wire.encode(kind, meta))


async def _serve(out_fd: int) -> int:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin.buffer)
    transport, _ = await loop.connect_write_pipe(asyncio.Protocol, os.fdopen(out_fd, "wb"))
    out = Corked(transport.write)
    server = DecoderServer(out)
    code = 0
    try:
        while (msg := await receive(reader)) is not None:
            if not server.handle(msg):
                break
    except wire.WireError as exc:
        log.error("protocol ended: %s", exc)
        code = 2
    server.close()
    out.flush()  # replies of the last turn, before the pipe closes
    transport.close()
    return code


def main(argv: list[str] | None = None) -> int:
    """The decoder process: serve the protocol on stdin/stdout until SHUTDOWN or end of input.
    `argv[0]`, when given, is the daemon's pid (it dies with the daemon). Returns the exit
    code."""
    from edge.diarization.worker.main import start_worker

    out_fd = start_worker(argv, "decoder process")
    # Ctrl-C in a terminal reaches the whole process group: the daemon ends this process
    # (end of input) once its sessions have drained, so their last audio is still decoded.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return asyncio.run(_serve(out_fd))


__all__ = ["HUNG_GRACE_S", "Corked", "DecoderProcess", "DecoderServer", "RemoteDecoder",
           "main"]
