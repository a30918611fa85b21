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
The loop side (`StreamDecoder.feed`) hands the pipe one chunk and awaits the moment the
thread has consumed every byte and asks for more: that hand-off returns exactly the audio
the chunk completed, so results are as fresh as the bytes, and there is never more than one
client frame buffered (`EDGE_MAX_FRAME_BYTES`): the receive loop does not read the next frame
until the decoder took this one, which is the backpressure. Only `sniff()` and the numpy
conversion are ours; the container parsing is FFmpeg's, for every format it knows.

The alternative, `av.CodecContext.create()` fed packets that we cut out of each container
ourselves, would mean writing Ogg, Matroska, MP4, ADTS and MP3 framing by hand; it is used
only where there is no container (raw Opus/Speex packets, `packets=True`). A shared thread
pool cannot serve demuxers that block in `read()`, hence one thread per session.

Cost (scripts/bench/server.py --formats linear16,webm-opus; README "Limits (measured)"): a
webm/opus session costs the daemon 1.6-1.9x a 16 kHz linear16 one, about 0.5 % of a core
more: libavcodec's Opus decode at 48 kHz (~23 us per 20 ms frame), PyAV's objects per packet
and frame, resampling, and four thread wake-ups a second. The loop pays only the hand-off
and the resampling: PyAV runs `av_read_frame` and `avcodec_send_packet` with the GIL
released (`with nogil` in its Cython source), so a decoder stuck inside FFmpeg does not hold
the loop either. `AudioFrame.to_ndarray()` and a resampler call per codec frame each cost
more than the decode and are avoided (`frame_pcm`, `SessionAudio._decoded`). Measured
start-up delay before the first audio: none for WebM/Ogg/MP3 beyond one piece; FLAC's
demuxer reads ~24 KB first (about 0.5 s of 48 kHz audio), FFmpeg's WAV demuxer 64 KB, which is
why WAV is parsed in edge/formats.py instead.

Failure policy: any FFmpeg error, a stream with no audio track, a codec FFmpeg cannot
decode, or `max_bytes_without_audio` bytes that yield no audio raise `DecodeError` (the
session answers Error + close 1008 DATA-0000). A chunk the thread has not finished within
`feed_timeout_s` raises `DecodeError` too (a stalled decoder); the thread is told to stop at
its next read and, being a daemon thread, cannot hold the process at exit. A thread stuck
inside FFmpeg itself cannot be killed: it stays until FFmpeg returns (a leaked thread per
such session, off the loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

import av
import numpy as np

from edge.formats import FORMAT_NAMES, DecodeError, Pcm

log = logging.getLogger("edge.decode")

MAX_BYTES_WITHOUT_AUDIO = 1 << 20  # garbage, or an MP4 whose index is at the end
FEED_TIMEOUT_S = 2.0  # default EDGE_DECODE_TIMEOUT_S: far above any real chunk (ms at most)


# --- PCM conversion (pure) -----------------------------------------------------------------

_SCALE = {"s16": 1 / 32768, "s32": 1 / 2147483648, "flt": 1.0, "dbl": 1.0, "u8": 1 / 128}
_DTYPES = {"s16": np.int16, "s32": np.int32, "flt": np.float32, "dbl": np.float64, "u8": np.uint8}


def frame_pcm(frame: av.AudioFrame) -> np.ndarray:
    """One decoded frame as float32 (samples, channels). Reads the planes' buffers directly:
    `AudioFrame.to_ndarray()` costs more than the Opus decode itself (measured)."""
    fmt = frame.format
    name = fmt.name.rstrip("p")
    if name not in _SCALE:
        raise DecodeError(f"decoder produced unsupported sample format {fmt.name}")
    channels = len(frame.layout.channels)
    n = frame.samples
    if fmt.is_planar and channels == 1:
        data = np.frombuffer(frame.planes[0], dtype=_DTYPES[name], count=n).reshape(n, 1)
    elif fmt.is_planar:
        data = np.stack([np.frombuffer(p, dtype=_DTYPES[name], count=n) for p in frame.planes],
                        axis=1)
    else:
        data = np.frombuffer(frame.planes[0], dtype=_DTYPES[name], count=n * channels)
        data = data.reshape(n, channels)
    out = data.astype(np.float32)  # a copy: the frame's buffer is reused by FFmpeg
    if name == "u8":
        out -= 128.0
    if _SCALE[name] != 1.0:
        out *= np.float32(_SCALE[name])
    return out


# --- the streaming decoder ------------------------------------------------------------------


class _Stop(Exception):
    """Raised inside FFmpeg's read callback when the decoder is closed: unwinds the thread."""


class _Pipe:
    """What FFmpeg reads from on the decoder thread: blocks until a chunk or the end arrives.

    Holds at most the one chunk the loop handed over (`StreamDecoder.feed` waits until it is
    consumed before handing over the next). Exposes only `read`, so PyAV treats it as a
    non-seekable stream.
    """

    def __init__(self, on_hungry: Callable[[], Callable[[], None] | None]) -> None:
        self._cond = threading.Condition()  # re-entrant: `lock` may be held around put()
        self.lock = self._cond
        self._buf = bytearray()
        self._eof = False
        self._closed = False
        self._on_hungry = on_hungry

    def put(self, data: bytes) -> None:
        with self._cond:
            self._buf += data
            self._cond.notify()

    @property
    def ended(self) -> bool:
        """The end of input was reached (given, and every byte read)."""
        with self._cond:
            return self._eof and not self._buf

    def end(self) -> None:
        with self._cond:
            self._eof = True
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def read(self, n: int) -> bytes:
        with self._cond:
            # "Hungry" is decided under the lock (so it names the chunk just used up) but
            # reported after releasing it: the loop, woken by the report, takes this lock
            # next to hand over the following chunk.
            wake = None if self._buf or self._eof or self._closed else self._on_hungry()
        if wake is not None:
            wake()
        with self._cond:
            while not self._buf and not self._eof and not self._closed:
                self._cond.wait()
            if self._closed:
                raise _Stop
            out = bytes(self._buf[:n])
            del self._buf[:n]
            return out


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
        self._lock = threading.Lock()
        self._out: list[Pcm] = []  # decoded, handed over at the next wake (under _lock)
        self._pending: list[Pcm] = []  # decoded by the thread since its last wake
        self._error: DecodeError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pipe = _Pipe(self._hungry)
        self._thread: threading.Thread | None = None
        self._done = False
        self._since_audio = 0  # bytes fed since the last audio came out
        self.decoded_samples = 0

    # --- loop side ---
    async def feed(self, data: bytes) -> list[Pcm]:
        """Decode `data`; returns the audio it completed. Raises DecodeError."""
        self._since_audio += len(data)
        out = await self._exchange(lambda: self._pipe.put(data))
        if out:
            self._since_audio = 0
        elif self._since_audio > self.max_bytes_without_audio:
            raise DecodeError(
                f"no audio decoded from the last {self._since_audio} bytes of {self.name}"
                + (f" ({self.codec})" if self.codec else "") + ": not audio, or corrupt")
        return out

    async def finish(self) -> list[Pcm]:
        """End of input: the decoder's tail. Raises DecodeError (also for a stream that ended
        before any audio, e.g. a truncated header)."""
        out = await self._exchange(self._pipe.end)
        if self.decoded_samples == 0 and not out:
            raise DecodeError(f"the {self.name} stream ended before any audio was decoded"
                              " (truncated or empty)")
        return out

    def close(self) -> None:
        """Stop the thread at its next read (idempotent; never blocks)."""
        self._pipe.close()

    async def _exchange(self, give: Callable[[], None]) -> list[Pcm]:
        if self._error is not None:
            raise self._error
        loop = asyncio.get_running_loop()
        self._loop = loop
        waiter: asyncio.Future[None] = loop.create_future()
        # Waiter and bytes go in together under the pipe's lock, so the thread's "hungry"
        # for an earlier state cannot settle this chunk's waiter before it saw the chunk.
        with self._pipe.lock:
            with self._lock:
                finished = self._done
                if not finished:
                    self._waiter = waiter
            if not finished:
                give()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"decode-{self.fmt}",
                                            daemon=True)
            self._thread.start()
        if not finished:
            try:
                async with asyncio.timeout(self.feed_timeout_s):
                    await waiter
            except TimeoutError:
                self.close()
                self._error = DecodeError(
                    f"the {self.name} decoder stalled: a {self.feed_timeout_s:g} s budget "
                    "for one chunk ran out")
                raise self._error from None
        with self._lock:
            self._waiter = None
            out, self._out = self._out, []
        if self._error is not None:
            raise self._error
        return out

    # --- decoder thread ---
    def _hungry(self) -> Callable[[], None] | None:
        """Called on the thread (pipe lock held) when it has used every byte given:
        publishes what it decoded, and returns the wake-up to run once the lock is free."""
        with self._lock:
            waiter, loop = self._waiter, self._loop
            self._waiter = None
            self._out += self._pending  # published once per hand-off, not per frame
        self._pending = []
        if waiter is None or loop is None:
            return None
        return lambda: _wake_loop(loop, waiter)

    def _wake(self) -> None:
        wake = self._hungry()
        if wake is not None:
            wake()

    def _emit(self, frame: av.AudioFrame) -> None:
        pcm = frame_pcm(frame)
        if pcm.size:
            self._pending.append(Pcm(pcm, frame.sample_rate))  # thread-only until _wake
            self.decoded_samples += pcm.shape[0]

    def _run(self) -> None:
        try:
            if self._packets:
                self._run_packets()
            else:
                self._run_container()
        except _Stop:
            pass
        except DecodeError as exc:
            self._error = exc
        except Exception as exc:  # FFmpeg's errors, or a PyAV bug: the loop must not wait
            if not isinstance(exc, (av.FFmpegError, OSError, ValueError)):
                log.exception("decoder thread failed")
            if self._pipe.ended and not self.decoded_samples:
                self._error = DecodeError(f"the {self.name} stream ended before any audio was"
                                          " decoded (truncated or empty)")
            else:
                detail = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
                self._error = DecodeError(f"cannot decode {self.name}"
                                          + (f" ({self.codec})" if self.codec else "")
                                          + f": {detail}")
        finally:
            with self._lock:
                self._done = True
            self._wake()

    def _run_container(self) -> None:
        options = {"probesize": "2048", "analyzeduration": "1"}
        if self.fmt == "wav":
            options["ignore_length"] = "1"  # streamed WAVs carry a 0 or bogus data size
        with av.open(self._pipe, mode="r", format=self.fmt, options=options,
                     buffer_size=8192) as container:
            if not container.streams.audio:
                kinds = sorted({s.type for s in container.streams}) or ["none"]
                raise DecodeError(f"the {self.name} stream has no audio track "
                                  f"(tracks: {', '.join(kinds)})")
            stream = container.streams.audio[0]
            if stream.codec_context is None:
                raise DecodeError(f"the {self.name} stream's audio codec is not one FFmpeg "
                                  "can decode")
            self.codec = stream.codec_context.name
            for packet in container.demux(stream):
                for frame in packet.decode():
                    self._emit(frame)

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
                self._emit(frame)
        for frame in ctx.decode(None):
            self._emit(frame)


def _wake_loop(loop: asyncio.AbstractEventLoop, waiter: asyncio.Future[None]) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
        loop.call_soon_threadsafe(_settle, waiter)


def _settle(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


__all__ = ["FEED_TIMEOUT_S", "MAX_BYTES_WITHOUT_AUDIO", "StreamDecoder", "frame_pcm"]
