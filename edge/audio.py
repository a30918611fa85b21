"""Device audio -> the session clock: decode, resample once to 16 kHz, count samples.

The session clock is the number of 16 kHz samples produced since the session's first byte;
every time in the daemon (upstream offsets, diarizer frames, Results) is seconds on it.
`SessionAudio.decode()` takes frames of any length and returns `AudioBlock`s placed on that
clock, one per output channel. Raw encodings (linear16, linear32, mulaw, alaw) are decoded
here with numpy, on the loop (microseconds per frame: `feed()`); 16 kHz mono linear16 in
whole samples is already the clock's PCM and is placed as it comes. WAV goes through
`WavDecoder` (edge/formats.py, numpy, on the loop), containers and compressed codecs through
the decoder `decoders` makes: in the daemon a `RemoteDecoder` (edge/decode_process.py, the
decoder process, which resamples to 16 kHz itself), else a `StreamDecoder` (edge/decode.py,
PyAV on its own thread); each gives (samples, channels) at some rate. `_convert()` is the
one place that averages the channels (or, with `split=True`, Deepgram's `multichannel`,
keeps them apart) and resamples onto the clock:
every output channel has its own resampler and they share one clock. With no `encoding`,
the first bytes decide (`sniff()`); nothing recognised means linear16 at `sample_rate`, as
room devices send it. A partial frame (an odd byte of linear16, a sample of some channels
only) is carried to the next frame, never dropped.
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from collections.abc import Callable

import numpy as np
import soxr

from edge.clock import PCM_SAMPLE_BYTES, SAMPLE_RATE, AudioBlock
from edge.decode import FEED_TIMEOUT_S, StreamDecoder
from edge.formats import (
    ALAW,
    FORMAT_NAMES,
    MAX_WAV_HEADER,
    MULAW,
    NEED_MORE,
    SNIFF_BYTES,
    DecodeError,
    Decoder,
    Pcm,
    WavDecoder,
    WavFormat,
    parse_wav_header,
    sniff,
)

# Bytes per sample of each raw encoding a device may send (the session clock's own PCM is
# `edge.clock.PCM_SAMPLE_BYTES`).
RAW_SAMPLE_BYTES = {"linear16": 2, "linear32": 4, "mulaw": 1, "alaw": 1}
# `encoding` values FFmpeg decodes -> (FFmpeg name, each frame is one packet of that codec).
# A recognised container (sniff) wins over the raw form: clients send Ogg/WebM as "opus".
FFMPEG_ENCODINGS = {
    "flac": ("flac", False), "ogg-opus": ("ogg", False), "amr-nb": ("amrnb", False),
    "amr-wb": ("amrwb", False), "g729": ("g729", False), "opus": ("opus", True),
    "speex": ("speex", True),
}


# soxr's "MQ" is 16-bit precision (stop band ~116 dB down, pass band flat to 7.5 kHz at
# 16 kHz, as "HQ"): the output is int16, so HQ's 20 bits bought nothing and cost ~25 % more.
RESAMPLE_QUALITY = "MQ"


def resampler(rate: int, channels: int = 1) -> soxr.ResampleStream | None:
    """A streaming float32 resampler from `rate` to the session clock's rate (None if it is
    that rate already)."""
    if rate == SAMPLE_RATE:
        return None
    return soxr.ResampleStream(rate, SAMPLE_RATE, channels, dtype="float32",
                               quality=RESAMPLE_QUALITY)


class SessionAudio:
    """One session's audio input: decoder, resamplers, clock, checksum and receive times.

    `encoding` None means "not given": the stream's first bytes decide (see module doc).
    `channels` is the declared channel count of raw audio; with `split` every channel is an
    output of its own (a container must then carry that many), else all are averaged to one.
    `decoders` makes the decoder of a container or compressed codec: it takes `StreamDecoder`'s
    arguments (the daemon gives `DecoderProcess.decoder`, which decodes in its own process);
    by default a `StreamDecoder` in this process.
    Raises ValueError for an encoding it cannot decode or fewer than one channel.
    """

    def __init__(self, encoding: str | None, sample_rate: int, history_s: float = 120.0,
                 channels: int = 1, split: bool = False,
                 decode_timeout_s: float = FEED_TIMEOUT_S,
                 decoders: Callable[..., Decoder] | None = None) -> None:
        if encoding is not None and encoding not in RAW_SAMPLE_BYTES | FFMPEG_ENCODINGS:
            raise ValueError(f"unsupported encoding {encoding!r}")
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        self.encoding = encoding
        self.sample_rate = sample_rate
        self.channels = channels
        self.outputs = channels if split else 1
        # None until the first bytes chose: raw (numpy, `feed`) or a StreamDecoder.
        self.decoder: Decoder | None = None
        self._head = b""  # bytes held while sniffing (at most SNIFF_BYTES + one frame)
        self._decode_timeout_s = decode_timeout_s
        self._decoders = decoders or StreamDecoder
        self._sniffing = encoding is None or encoding in FFMPEG_ENCODINGS
        self._finished = False
        self._source_s = 0.0  # seconds of decoded audio at the source's rate
        self._width = RAW_SAMPLE_BYTES.get(encoding or "linear16", 2)
        self._frame = self._width * channels  # bytes of one interleaved raw sample frame
        self._carry = b""
        # Raw audio that is already the clock's PCM (linear16, 16 kHz, mono): `feed` places a
        # frame of whole samples as it is, with no decode, mix or resample step.
        self._clock_pcm = (encoding or "linear16") == "linear16" and sample_rate == SAMPLE_RATE \
            and channels == 1
        self._rate = sample_rate  # the rate the resamplers convert from
        self._resamplers = [resampler(sample_rate) for _ in range(self.outputs)]
        self._sha = hashlib.sha256()
        self.received_bytes = 0
        self.next_sample = 0  # the session clock, in 16 kHz samples
        # (end sample, monotonic receive time) per block, for "word end -> sent" latency.
        self._received: deque[tuple[int, float]] = deque(maxlen=max(16, int(history_s * 50)))

    @property
    def duration(self) -> float:
        """Seconds of audio received, at the device's own rate."""
        if self.decoder is not None:
            return self._source_s
        return self.received_bytes // self._frame / self.sample_rate

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()

    @property
    def clock(self) -> float:
        """The session clock now: seconds of 16 kHz audio produced."""
        return self.next_sample / SAMPLE_RATE

    async def decode(self, data: bytes) -> list[AudioBlock]:
        """Decode one client frame in any supported form; returns the new 16 kHz audio, one
        block per output channel (empty if none was produced yet). Raises DecodeError for
        undecodable audio."""
        if not self._sniffing:
            if self.decoder is None:
                return self.feed(data)
            self._count(data)
            return self._place(self._decoded(await self.decoder.feed(data)))
        self._count(data)
        packets = self.encoding is not None and FFMPEG_ENCODINGS[self.encoding][1]
        # Raw Opus/Speex: every frame is one packet, so only the first frame is sniffed.
        head = data if packets else self._head + data
        found = sniff(head)
        if found == NEED_MORE and not packets and len(head) < SNIFF_BYTES:
            self._head = head
            return []
        wav = parse_wav_header(head) if found == "wav" else None
        if wav == NEED_MORE:
            if len(head) > MAX_WAV_HEADER:
                raise DecodeError(f"the WAV header is longer than {MAX_WAV_HEADER} bytes")
            self._head = head
            return []
        self._head = b""
        self._sniffing = False
        if isinstance(wav, WavFormat):  # plain samples: numpy, no thread, no delay
            self.decoder = WavDecoder(wav)
            head = head[wav.data_offset:]
        elif found not in (None, NEED_MORE):
            self.decoder = self._decoders(found, feed_timeout_s=self._decode_timeout_s)
        elif self.encoding is not None:
            name, _ = FFMPEG_ENCODINGS[self.encoding]
            self.decoder = self._decoders(name, packets=packets, rate=self.sample_rate,
                                          feed_timeout_s=self._decode_timeout_s)
        else:  # no container: raw linear16 at `sample_rate`, as room devices send it
            return self._place(self._raw(head))
        return self._place(self._decoded(await self.decoder.feed(head)))

    async def finish(self) -> list[AudioBlock]:
        """End of audio: the decoder's and the resamplers' tails. Idempotent. Raises
        DecodeError (a container that ends before any audio: truncated or empty)."""
        if self._finished:
            return []
        self._finished = True
        if self._sniffing and self._head:  # held while sniffing: raw, unless a container
            self._sniffing = False
            found = sniff(self._head)
            if found not in (None, NEED_MORE):
                raise DecodeError(f"the {FORMAT_NAMES[found]} stream ended inside its header "
                                  f"({len(self._head)} bytes): truncated")
            return self._place(_cat(self._raw(self._head), self._drain()))
        if self.decoder is None:
            return self.flush()
        return self._place(_cat(self._decoded(await self.decoder.finish()), self._tails()))

    def close(self) -> None:
        """Stop the decoder thread, if any (idempotent, never blocks)."""
        if self.decoder is not None:
            self.decoder.close()

    def feed(self, data: bytes) -> list[AudioBlock]:
        """Decode one frame of raw audio in the declared encoding (linear16 when none was
        given); returns the new 16 kHz audio, one block per output channel (empty when none
        was produced)."""
        self._count(data)
        if self._clock_pcm and not self._carry and not len(data) % PCM_SAMPLE_BYTES:
            return self._place([np.frombuffer(data, dtype="<i2")])
        return self._place(self._raw(data))

    def flush(self) -> list[AudioBlock]:
        """End of audio: the resamplers' tails (a partial trailing frame is dropped here,
        the only place it can go — it is not a sample of every channel)."""
        return self._place(self._drain())

    def received_at(self, t: float) -> float | None:
        """Monotonic time at which the audio at session time `t` arrived (None if unknown)."""
        sample = int(t * SAMPLE_RATE)
        for end, when in self._received:
            if end >= sample:
                return when
        return None

    def received_before(self, when: float) -> float:
        """Session seconds of audio that had arrived by monotonic time `when` (0.0 if none
        is remembered)."""
        for end, at in reversed(self._received):
            if at <= when:
                return end / SAMPLE_RATE
        return 0.0

    # --- internals: every path gives per-output int16 arrays at 16 kHz, placed once ---

    def _count(self, data: bytes) -> None:
        self._sha.update(data)
        self.received_bytes += len(data)

    def _raw(self, data: bytes) -> list[np.ndarray] | None:
        if self._carry:
            data = self._carry + data
        usable = len(data) - len(data) % self._frame
        self._carry = data[usable:]
        if not usable:
            return None
        samples = self._decode(memoryview(data)[:usable]).reshape(-1, self.channels)
        return self._convert(samples, self.sample_rate)

    def _drain(self) -> list[np.ndarray]:
        self._carry = b""
        return self._tails()

    def _decoded(self, parts: list[Pcm]) -> list[np.ndarray] | None:
        """Decoded audio (float32 (samples, channels) at its rate) -> per-output 16 kHz."""
        out: list[np.ndarray] | None = None
        i = 0
        while i < len(parts):
            # One resampler call per run of one rate and layout (a codec frame is ~20 ms:
            # per-frame calls cost more than the resampling).
            rate, channels = parts[i].rate, parts[i].samples.shape[1]
            j = i + 1
            while j < len(parts) and parts[j].rate == rate \
                    and parts[j].samples.shape[1] == channels:
                j += 1
            samples = np.concatenate([p.samples for p in parts[i:j]]) if j > i + 1 \
                else parts[i].samples
            i = j
            self._source_s += samples.shape[0] / rate
            out = _cat(out, self._convert(samples, rate))
        return out

    def _convert(self, samples: np.ndarray, rate: int) -> list[np.ndarray]:
        """(samples, channels), int16 or float32 in [-1, 1], at `rate` -> one int16 16 kHz
        array per output: the one place where channels are averaged or kept apart."""
        tails = None
        if rate != self._rate:  # a new rate mid-stream (chained Ogg, ...)
            tails = self._tails()
            self._rate = rate
            self._resamplers = [resampler(rate) for _ in range(self.outputs)]
        channels = samples.shape[1]
        if self.outputs == 1:
            if channels == 1:
                columns = [samples[:, 0]]
            elif samples.dtype == np.int16:
                columns = [np.rint(samples.astype(np.float32).mean(axis=1)).astype(np.int16)]
            else:
                columns = [samples.mean(axis=1, dtype=np.float32)]
        elif channels != self.outputs:
            raise DecodeError(f"the audio has {channels} channel(s), but multichannel was asked "
                              f"with channels={self.outputs}")
        else:
            columns = [samples[:, c] for c in range(channels)]
        converted = [self._resample(k, column, last=False) for k, column in enumerate(columns)]
        return _cat(tails, converted)

    def _tails(self) -> list[np.ndarray]:
        return [self._resample(k, np.zeros(0, np.float32), last=True) for k in range(self.outputs)]

    def _resample(self, channel: int, samples: np.ndarray, last: bool) -> np.ndarray:
        resampler = self._resamplers[channel]
        if samples.dtype == np.int16:
            if resampler is None:
                return samples  # the common case (16 kHz linear16): exact, no float round trip
            samples = samples.astype(np.float32) / 32768.0
        if resampler is None:
            out = samples * np.float32(32768.0)
        else:  # soxr's output is ours: scaled, rounded and clipped in place
            out = resampler.resample_chunk(samples, last=last)
            out *= np.float32(32768.0)
        np.rint(out, out=out)
        return np.clip(out, -32768, 32767, out=out).astype(np.int16)

    def _place(self, parts: list[np.ndarray] | None) -> list[AudioBlock]:
        if not parts:
            return []
        # Channels resample in step (same rate, same input length): one clock for all.
        n = min(len(p) for p in parts)
        if n == 0:
            return []
        start = self.next_sample
        self.next_sample += n
        self._received.append((self.next_sample, time.monotonic()))
        return [AudioBlock(start, p[:n].astype("<i2", copy=False).tobytes()) for p in parts]

    def _decode(self, data: memoryview) -> np.ndarray:
        if self.encoding == "linear32":  # Deepgram's linear32: little-endian float32
            floats = np.frombuffer(data, dtype="<f4")
            return np.clip(np.rint(floats * 32768.0), -32768, 32767).astype(np.int16)
        raw = np.frombuffer(data, dtype=np.uint8 if self._width == 1 else "<i2")
        if self.encoding == "mulaw":
            return MULAW[raw]
        if self.encoding == "alaw":
            return ALAW[raw]
        return raw


def _cat(a: list[np.ndarray] | None, b: list[np.ndarray] | None) -> list[np.ndarray] | None:
    """Per-output concatenation of two consecutive stretches of audio (either may be None)."""
    if a is None or b is None:
        return a or b
    return [np.concatenate((x, y)) for x, y in zip(a, b, strict=True)]


__all__ = ["ALAW", "FFMPEG_ENCODINGS", "MULAW", "DecodeError", "SessionAudio"]
