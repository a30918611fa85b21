"""Compressed audio: a streaming PyAV (FFmpeg) decoder fed with bytes as they arrive.

`StreamDecoder` turns a stream of byte chunks in a container (named by `sniff()` in
edge/formats.py, or by the `encoding` query) into `Pcm` (float32 samples of shape
(n, channels) at the source's own rate); `SessionAudio` (edge/audio.py) downmixes and
resamples that to the session clock.

Why a demuxer thread per stream, fed one chunk at a time. FFmpeg's demuxers pull bytes from
an AVIOContext; PyAV lets that be any object with `read()`. An `av.open()` on a buffer that
says "end of file" when it is momentarily empty ends the stream (re-probing after every chunk
would re-parse headers and lose demuxer state), and a `read()` that blocks until bytes arrive
cannot run on the event loop. So each decoder owns one thread that runs PyAV's ordinary
`open -> demux -> decode` loop over a `_Pipe` whose `read()` blocks on a condition variable.
The loop side (`StreamDecoder.feed`) hands the pipe one chunk and waits for the moment the
thread has consumed every byte and asks for more: that hand-off returns exactly the audio
the chunk completed, so results are as fresh as the bytes, and there is never more than one
client frame buffered (`EDGE_MAX_FRAME_BYTES`): the receive loop does not read the next frame
until the decoder took this one, which is the backpressure. Only `sniff()` and the numpy
conversion are ours; the container parsing is FFmpeg's, for every format it knows.

The alternative, `av.CodecContext.create()` fed packets that we cut out of each container
ourselves, would mean writing Ogg, Matroska, MP4, ADTS and MP3 framing by hand; it is used
only where there is no container (raw Opus/Speex packets, `packets=True`). A shared thread
pool cannot serve demuxers that block in `read()`, hence one thread per session.

Cost, and why the loop waits for the thread blocking. PyAV releases the GIL around every
FFmpeg call and takes it back after each, several times per 20 ms Opus packet; when the loop
runs Python meanwhile, each take is contended (futex waits, context switches) and costs more
than the decode. So the loop waits for a chunk's decode blocking, with the GIL released
(`HANDOFF_WAIT_S` at most; a 250 ms WebM/Opus piece takes ~0.5 ms); only a slower chunk is
then awaited asynchronously. Where the rest of a session's cost goes, and what was tried:
docs/notes/pyav-decode.md. Measured start-up delay before the first audio: none for
WebM/Ogg/MP3 beyond one piece; FLAC's demuxer reads ~24 KB first (about 0.5 s of 48 kHz
audio), FFmpeg's WAV demuxer 64 KB, which is why WAV is parsed in edge/formats.py instead.

Where it runs. By default the daemon decodes in its decoder process (edge/decode_process.py,
`EDGE_DECODER=process`), whose loop does nothing but decode: there each stream's demuxer runs
in a greenlet on that loop (`InlineDecoder`: no thread, no hand-off, no GIL traffic), and the
daemon's own loop never waits on FFmpeg. `StreamDecoder` itself serves `EDGE_DECODER=thread`
and the tools that decode in their own process.

Failure policy: any FFmpeg error, a stream with no audio track, a codec FFmpeg cannot
decode, or `max_bytes_without_audio` bytes that yield no audio raise `DecodeError` (the
session answers Error + close 1008 DATA-0000). A chunk the thread has not finished within
`feed_timeout_s` raises `DecodeError` too (a stalled decoder: it holds the loop for
`HANDOFF_WAIT_S` at most, and no other session's decoder); the thread is told to stop at its
next read and, being a daemon thread, cannot hold the process at exit. A thread stuck inside
FFmpeg itself cannot be killed: it stays until FFmpeg returns (a leaked thread per such
session, off the loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import av
import greenlet
import numpy as np

from edge.formats import FORMAT_NAMES, DecodeError, Pcm

log = logging.getLogger("edge.decode")

MAX_BYTES_WITHOUT_AUDIO = 1 << 20  # garbage, or an MP4 whose index is at the end
# How long the loop waits for a chunk's decode blocking (GIL released) before awaiting the
# rest (module doc): a 250 ms WebM/Opus piece takes ~0.5 ms, so with a free core this is not
# reached; it bounds what one hand-off costs the loop, far under the 20 ms loop-lag bound.
HANDOFF_WAIT_S = 0.005
FEED_TIMEOUT_S = 2.0  # default EDGE_DECODE_TIMEOUT_S: far above any real chunk (ms at most)
# How a container is opened on a stream of pieces: probe no more than the first bytes (the
# first audio waits for nothing else), read in `READ_BUFFER_BYTES` at most.
OPEN_OPTIONS: dict[str, str] = {"probesize": "2048", "analyzeduration": "1"}
READ_BUFFER_BYTES = 8192


# --- PCM conversion (pure) -----------------------------------------------------------------

_SCALE = {"s16": 1 / 32768, "s32": 1 / 2147483648, "flt": 1.0, "dbl": 1.0, "u8": 1 / 128}
_DTYPES = {"s16": np.int16, "s32": np.int32, "flt": np.float32, "dbl": np.float64, "u8": np.uint8}

# What one run of frames shares: (FFmpeg sample format, channels, rate).
RunKey = tuple[str, int, int]


def run_key(frame: av.AudioFrame) -> RunKey:
    """The frame's (sample format, channels, rate). Raises DecodeError for a sample format
    `frames_pcm` does not convert."""
    key = (frame.format.name, frame.layout.nb_channels, frame.sample_rate)
    if key[0].rstrip("p") not in _SCALE:
        raise DecodeError(f"decoder produced unsupported sample format {key[0]}")
    return key


def frames_pcm(frames: list[av.AudioFrame], key: RunKey) -> Pcm:
    """Consecutive decoded frames sharing `key` (see `run_key`) as one float32 (samples,
    channels) Pcm. The frames' bytes are joined first and converted once: numpy per 20 ms
    frame, like `AudioFrame.to_ndarray()`, costs more than the Opus decode itself (measured)."""
    fmt, channels, rate = key
    name = fmt.rstrip("p")
    dtype = np.dtype(_DTYPES[name])
    if fmt.endswith("p") and channels > 1:  # planar: one plane per channel
        data = np.stack([np.frombuffer(_join(frames, c, dtype.itemsize), dtype=dtype)
                         for c in range(channels)], axis=1)
    else:
        data = np.frombuffer(_join(frames, 0, dtype.itemsize * channels), dtype=dtype)
        data = data.reshape(-1, channels)
    if name == "flt":
        return Pcm(data, rate)  # already float32 in [-1, 1]: no copy (join made one)
    out = data.astype(np.float32)
    if name == "u8":
        out -= 128.0
    if _SCALE[name] != 1.0:
        out *= np.float32(_SCALE[name])
    return Pcm(out, rate)


def _join(frames: list[av.AudioFrame], plane: int, width: int) -> bytes:
    # A plane's buffer may be padded past its samples: take exactly samples * width bytes.
    return b"".join(memoryview(f.planes[plane])[:f.samples * width] for f in frames)


# --- the streaming decoder ------------------------------------------------------------------


class _Pipe:
    """What FFmpeg reads from on the decoder thread: blocks until a chunk or the end arrives.

    Holds at most the one chunk the loop handed over (`StreamDecoder.feed` waits until it is
    consumed before handing over the next). Exposes only `read`, so PyAV treats it as a
    non-seekable stream. Two plain locks, no `threading.Condition` (whose every wait builds
    a lock and runs a dozen Python lines, on each hand-off): `mutex` guards the state, and
    `_ready`, held while there is nothing new, is released by whoever gives the thread
    something (`put`, `end`, `close`, always under `mutex`); only the thread acquires it.
    """

    def __init__(self, on_hungry: Callable[[], Callable[[], None] | None]) -> None:
        self.mutex = threading.Lock()
        self._ready = threading.Lock()
        self._ready.acquire()
        self._buf = bytearray()
        self._eof = False
        self._closed = False
        self._on_hungry = on_hungry

    def put(self, data: bytes) -> None:
        """Add bytes for the thread. Call with `mutex` held."""
        self._buf += data
        self._signal()

    def end(self) -> None:
        """No more bytes will come. Call with `mutex` held."""
        self._eof = True
        self._signal()

    def _signal(self) -> None:
        if self._ready.locked():
            self._ready.release()

    @property
    def ended(self) -> bool:
        """The end of input was reached (given, and every byte read)."""
        with self.mutex:
            return self._eof and not self._buf

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        with self.mutex:
            self._closed = True
            self._signal()

    def read(self, n: int) -> bytes:
        while True:
            with self.mutex:
                if self._buf and not self._closed:
                    out = bytes(self._buf[:n])
                    del self._buf[:n]
                    return out
                if self._eof or self._closed:
                    # Closed: "end of file" lets FFmpeg unwind on its own. An exception
                    # raised in this callback is printed by PyAV ("exception being
                    # dropped", a traceback on stderr per session) before it propagates.
                    return b""
                # Every byte given is used: "hungry" is decided under the lock (so it names
                # the chunk just used up) but the loop's wake-up runs after releasing it.
                wake = self._on_hungry()
            if wake is not None:
                wake()
            self._ready.acquire()  # until put/end/close: the GIL is released meanwhile


class StreamDecoder:
    """A streaming decoder for one session: `await feed(chunk)` -> the Pcm it completed.

    `fmt` is an FFmpeg input format name (from `sniff()`, or fixed by the `encoding` query).
    `packets=True` instead decodes every chunk as one packet of codec `fmt` (raw Opus/Speex
    frames, one per websocket message), with `rate`/`channels` from the query.
    """

    def __init__(
        self, fmt: str, *, packets: bool = False, rate: int | None = None, channels: int = 1,
        feed_timeout_s: float = FEED_TIMEOUT_S,
        max_bytes_without_audio: int = MAX_BYTES_WITHOUT_AUDIO,
    ) -> None:
        self.fmt = fmt
        self.name = FORMAT_NAMES.get(fmt, fmt)
        self.feed_timeout_s = feed_timeout_s
        self.max_bytes_without_audio = max_bytes_without_audio
        self.codec: str | None = None  # the audio codec, once the container named it
        self._packets = packets
        self._rate, self._channels = rate, channels
        self._pipe = _Pipe(self._hungry)
        self._lock = self._pipe.mutex  # one lock for the pipe and the hand-off state
        self._out: list[Pcm] = []  # decoded, handed over at the next wake (under _lock)
        # Frames decoded by the thread since its last wake, in runs of one RunKey (thread-only).
        self._runs: list[tuple[RunKey, list[av.AudioFrame]]] = []
        self._error: DecodeError | None = None
        self._busy = False  # the thread has bytes it has not used up (under _lock)
        self._idle = threading.Lock()  # released by the thread when it stops being busy
        self._waiter: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._done = False
        self._since_audio = 0  # bytes fed since the last audio came out
        self.decoded_samples = 0

    # --- loop side ---
    async def feed(self, data: bytes) -> list[Pcm]:
        """Decode `data`; returns the audio it completed. Raises DecodeError."""
        return self._fed(data, await self._exchange(data))

    async def finish(self) -> list[Pcm]:
        """End of input: the decoder's tail. Raises DecodeError (also for a stream that ended
        before any audio, e.g. a truncated header)."""
        return self._finished(await self._exchange(None))

    def _stalled(self) -> DecodeError:
        return DecodeError(f"the {self.name} decoder stalled: a {self.feed_timeout_s:g} s "
                           "budget for one chunk ran out")

    def _fed(self, data: bytes, out: list[Pcm]) -> list[Pcm]:
        """What chunk `data` gave, checked: too many bytes with no audio raise DecodeError."""
        self._since_audio += len(data)
        if out:
            self._since_audio = 0
        elif self._since_audio > self.max_bytes_without_audio:
            raise DecodeError(
                f"no audio decoded from the last {self._since_audio} bytes of {self.name}"
                + (f" ({self.codec})" if self.codec else "") + ": not audio, or corrupt")
        return out

    def _finished(self, out: list[Pcm]) -> list[Pcm]:
        """The tail, checked: a stream with no audio at all raises DecodeError."""
        if self.decoded_samples == 0 and not out:
            raise DecodeError(f"the {self.name} stream ended before any audio was decoded"
                              " (truncated or empty)")
        return out

    def close(self) -> None:
        """Stop the thread at its next read (idempotent; never blocks)."""
        self._pipe.close()

    async def _exchange(self, data: bytes | None) -> list[Pcm]:
        """Hand the thread one chunk (None: the end of input) and return what it decoded
        from it. Waits up to HANDOFF_WAIT_S blocking, with the GIL released, which is all a
        chunk normally takes; only a slower chunk is awaited on the loop, up to
        `feed_timeout_s` in all."""
        if self._error is not None:
            raise self._error
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"decode-{self.fmt}",
                                            daemon=True)
            self._thread.start()
        self._idle.acquire(blocking=False)  # held from here until the thread is hungry
        # Busy flag and bytes go in together under the one lock, so the thread's "hungry"
        # for an earlier state cannot end this chunk's hand-off before it saw the chunk.
        with self._lock:
            self._busy = not self._done
            if self._busy:
                if data is None:
                    self._pipe.end()
                else:
                    self._pipe.put(data)
        blocking = min(HANDOFF_WAIT_S, self.feed_timeout_s)
        if self._busy and not self._idle.acquire(timeout=blocking):
            await self._await_hungry(self.feed_timeout_s - blocking)
        with self._lock:
            out, self._out = self._out, []
        if self._error is not None:
            raise self._error
        return out

    async def _await_hungry(self, budget_s: float) -> None:
        """The rest of a slow hand-off, awaited for up to `budget_s`. Raises DecodeError
        (stalled)."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if not self._busy:  # finished between the blocking wait and here
                return
            self._waiter, self._loop = waiter, loop
        try:
            async with asyncio.timeout(budget_s):
                await waiter
        except TimeoutError:
            self.close()
            self._error = self._stalled()
            raise self._error from None
        finally:
            with self._lock:
                self._waiter = None

    # --- decoder thread ---
    def _hungry(self) -> Callable[[], None] | None:
        """Called on the thread, `_lock` held, when it has used every byte given:
        publishes what it decoded, and returns the loop's wake-up to run once the lock is
        free (None when the loop is not awaiting)."""
        self._out += [frames_pcm(frames, key) for key, frames in self._runs]  # once per hand-off
        self._runs = []
        if not self._busy:
            return None
        # Not busy and `_idle` released in one step: the loop, seeing `_busy` False,
        # relies on this hand-off's release being done (see `_exchange`).
        self._busy = False
        self._idle.release()
        waiter, loop = self._waiter, self._loop
        self._waiter = None
        if waiter is None or loop is None:
            return None
        return lambda: _wake_loop(loop, waiter)

    def _end(self) -> None:
        """The thread is done: publish the rest and wake the loop."""
        with self._lock:
            self._done = True
            wake = self._hungry()
        if wake is not None:
            wake()

    def _take(self, frame: av.AudioFrame) -> None:
        """Keep one decoded frame for the next hand-off (thread-only): no conversion here."""
        n = frame.samples
        if not n:
            return
        key = run_key(frame)
        if not self._runs or self._runs[-1][0] != key:
            self._runs.append((key, []))
        self._runs[-1][1].append(frame)
        self.decoded_samples += n

    def _run(self) -> None:
        try:
            if self._packets:
                self._run_packets()
            else:
                self._run_container()
        except Exception as exc:  # FFmpeg's errors, or a PyAV bug: the loop must not wait
            if not isinstance(exc, (DecodeError, av.FFmpegError, OSError, ValueError)):
                log.exception("decoder thread failed")
            if self._pipe.closed:
                pass  # cut off by close() (its "end of file"): nobody listens, a stall stands
            elif isinstance(exc, DecodeError):
                self._error = exc
            elif self._pipe.ended and not self.decoded_samples:
                self._error = DecodeError(f"the {self.name} stream ended before any audio was"
                                          " decoded (truncated or empty)")
            else:
                detail = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
                self._error = DecodeError(f"cannot decode {self.name}"
                                          + (f" ({self.codec})" if self.codec else "")
                                          + f": {detail}")
        finally:
            self._end()

    def _run_container(self) -> None:
        options = dict(OPEN_OPTIONS)
        if self.fmt == "wav":
            options["ignore_length"] = "1"  # streamed WAVs carry a 0 or bogus data size
        with av.open(self._pipe, mode="r", format=self.fmt, options=options,
                     buffer_size=READ_BUFFER_BYTES) as container:
            if not container.streams.audio:
                kinds = sorted({s.type for s in container.streams}) or ["none"]
                raise DecodeError(f"the {self.name} stream has no audio track "
                                  f"(tracks: {', '.join(kinds)})")
            stream = container.streams.audio[0]
            if stream.codec_context is None:
                raise DecodeError(f"the {self.name} stream's audio codec is not one FFmpeg "
                                  "can decode")
            self.codec = stream.codec_context.name
            for frame in container.decode(stream):  # demux + decode in PyAV's Cython loop
                self._take(frame)

    def _run_packets(self) -> None:
        ctx: Any = av.CodecContext.create(self.fmt, "r")
        ctx.sample_rate = self._rate
        ctx.layout = "mono" if self._channels == 1 else "stereo"
        self.codec = ctx.name
        while True:
            chunk = self._pipe.read(1 << 24)
            if not chunk:
                break
            for frame in ctx.decode(av.Packet(chunk)):
                self._take(frame)
        for frame in ctx.decode(None):
            self._take(frame)


class _GreenPipe:
    """What FFmpeg reads from in an `InlineDecoder`: switches back to the caller when out of
    bytes. Past `deadline` (a chunk's decode budget) it ends the input ("end of file", so
    FFmpeg unwinds on its own) and sets `stalled`."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._eof = False
        self._closed = False
        self.stalled = False
        self.deadline = float("inf")
        self.caller: greenlet.greenlet | None = None

    def put(self, data: bytes) -> None:
        self._buf += data

    def end(self) -> None:
        self._eof = True

    @property
    def ended(self) -> bool:
        return self._eof and not self._buf

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        self._closed = True

    def read(self, n: int) -> bytes:
        while True:
            if self._closed:
                return b""
            if self._buf:
                if time.monotonic() > self.deadline:
                    self.stalled = self._closed = True
                    return b""
                out = bytes(self._buf[:n])
                del self._buf[:n]
                return out
            if self._eof:
                return b""
            assert self.caller is not None
            self.caller.switch()  # back to `_exchange_now`: every byte given is used


class InlineDecoder(StreamDecoder):
    """`StreamDecoder` with its demuxer and decoder run on the caller's thread, in a greenlet
    that switches back whenever FFmpeg asks for bytes not given yet: no thread, no hand-off,
    no GIL traffic. For the decoder process (edge/decode_process.py), whose loop does nothing
    else: there a hand-off's thread wake-ups cost more than the decode. A slow chunk is cut off
    at FFmpeg's next read once `feed_timeout_s` has passed (DecodeError "stalled"); a call
    into FFmpeg that never comes back to read holds the thread, so that process is killed by
    the daemon (`HUNG_GRACE_S`)."""

    def __init__(self, fmt: str, **kwargs: Any) -> None:
        super().__init__(fmt, **kwargs)
        self._pipe: _GreenPipe = _GreenPipe()  # type: ignore[assignment]
        self._demuxer: greenlet.greenlet | None = None

    def decode(self, data: bytes | None) -> list[Pcm]:
        """`feed(data)` (None: `finish()`) as a plain call: nothing in it waits but the decode
        itself. Raises DecodeError."""
        if data is None:
            return self._finished(self._exchange_now(None))
        return self._fed(data, self._exchange_now(data))

    async def _exchange(self, data: bytes | None) -> list[Pcm]:
        return self._exchange_now(data)

    def _exchange_now(self, data: bytes | None) -> list[Pcm]:
        """Give the demuxer one chunk (None: the end of input) and return what it decoded
        from it. Raises DecodeError."""
        if self._error is not None:
            raise self._error
        if not self._done:
            if data is None:
                self._pipe.end()
            else:
                self._pipe.put(data)
            self._switch(time.monotonic() + self.feed_timeout_s)
        out = [frames_pcm(frames, key) for key, frames in self._runs]
        self._runs = []
        if self._pipe.stalled and self._error is None:
            self._error = self._stalled()
        if self._error is not None:
            raise self._error
        return out

    def _switch(self, deadline: float) -> None:
        """Run the demuxer until it has used every byte given (or ended)."""
        if self._demuxer is None:
            self._demuxer = greenlet.greenlet(self._run)
        here = greenlet.getcurrent()
        self._demuxer.parent = here  # where it goes when `_run` returns
        self._pipe.caller, self._pipe.deadline = here, deadline
        self._demuxer.switch()

    def _end(self) -> None:
        self._done = True

    def close(self) -> None:
        """End the input; a suspended demuxer reads "end of file" and unwinds now."""
        self._pipe.close()
        if self._demuxer is not None and not self._demuxer.dead \
                and greenlet.getcurrent() is not self._demuxer:
            self._switch(float("inf"))


def _wake_loop(loop: asyncio.AbstractEventLoop, waiter: asyncio.Future[None]) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
        loop.call_soon_threadsafe(_settle, waiter)


def _settle(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


__all__ = ["FEED_TIMEOUT_S", "HANDOFF_WAIT_S", "MAX_BYTES_WITHOUT_AUDIO", "OPEN_OPTIONS",
           "READ_BUFFER_BYTES", "InlineDecoder", "StreamDecoder", "frames_pcm", "run_key"]
