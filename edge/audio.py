"""Device audio -> the session clock: decode, resample once to 16 kHz, count samples.

The session clock is the number of 16 kHz samples produced since the session's first byte;
every time in the daemon (upstream offsets, diarizer frames, Results) is seconds on it.
`SessionAudio.feed()` takes frames of any length in the declared encoding and returns
`AudioBlock`s placed on that clock: one per output channel. Interleaved input of `channels`
channels is downmixed to one (the mean), or with `split=True` (Deepgram's `multichannel`)
kept apart: every output channel has its own resampler and they share one clock. A partial
frame (an odd byte of linear16, a sample of some channels only) is carried to the next frame,
never dropped.
"""

from __future__ import annotations

import hashlib
import time
from collections import deque

import numpy as np
import soxr

from edge.stt.base import SAMPLE_RATE, AudioBlock


def _mulaw_table() -> np.ndarray:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    exponent = (u >> 4) & 0x07
    mantissa = u & 0x0F
    magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
    return np.where(u & 0x80, -magnitude, magnitude).astype(np.int16)


def _alaw_table() -> np.ndarray:
    a = np.arange(256, dtype=np.int32) ^ 0x55
    exponent = (a >> 4) & 0x07
    mantissa = a & 0x0F
    magnitude = np.where(
        exponent == 0, (mantissa << 4) + 8, ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0)
    )
    return np.where(a & 0x80, magnitude, -magnitude).astype(np.int16)


# G.711 decoding tables (ITU-T G.711), 8-bit code -> linear 16-bit sample.
MULAW = _mulaw_table()
ALAW = _alaw_table()
BYTES_PER_SAMPLE = {"linear16": 2, "mulaw": 1, "alaw": 1}


class SessionAudio:
    """One session's audio input: decoder, resampler, clock, checksum and receive times."""

    def __init__(self, encoding: str, sample_rate: int, history_s: float = 120.0,
                 channels: int = 1, split: bool = False) -> None:
        """Raises ValueError for an encoding it cannot decode or fewer than one channel."""
        if encoding not in BYTES_PER_SAMPLE:
            raise ValueError(f"unsupported encoding {encoding!r}")
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        self.encoding = encoding
        self.sample_rate = sample_rate
        self.channels = channels
        self.outputs = channels if split else 1
        self._width = BYTES_PER_SAMPLE[encoding]
        self._frame = self._width * channels  # bytes of one interleaved sample frame
        self._carry = b""
        self._resamplers = [
            None
            if sample_rate == SAMPLE_RATE
            else soxr.ResampleStream(sample_rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
            for _ in range(self.outputs)
        ]
        self._sha = hashlib.sha256()
        self.received_bytes = 0
        self.next_sample = 0  # the session clock, in 16 kHz samples
        # (end sample, monotonic receive time) per block, for "word end -> sent" latency.
        self._received: deque[tuple[int, float]] = deque(maxlen=max(16, int(history_s * 50)))

    @property
    def duration(self) -> float:
        """Seconds of audio received, at the device's own rate."""
        return self.received_bytes // self._frame / self.sample_rate

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()

    @property
    def clock(self) -> float:
        """The session clock now: seconds of 16 kHz audio produced."""
        return self.next_sample / SAMPLE_RATE

    def feed(self, data: bytes) -> list[AudioBlock]:
        """Decode one device frame; returns the new 16 kHz audio, one block per output
        channel (empty when none was produced yet)."""
        self._sha.update(data)
        self.received_bytes += len(data)
        if self._carry:
            data = self._carry + data
        usable = len(data) - len(data) % self._frame
        self._carry = data[usable:]
        if not usable:
            return []
        samples = self._decode(memoryview(data)[:usable]).reshape(-1, self.channels)
        return self._emit(samples, last=False)

    def flush(self) -> list[AudioBlock]:
        """End of audio: the resamplers' tails (a partial trailing frame is dropped here,
        the only place it can go — it is not a sample of every channel)."""
        self._carry = b""
        if self._resamplers[0] is None:
            return []
        return self._emit(np.zeros((0, self.channels), np.int16), last=True)

    def _emit(self, samples: np.ndarray, last: bool) -> list[AudioBlock]:
        """Decoded `samples` (frames x channels, int16 at the device rate) -> 16 kHz mono
        blocks on the session clock, one per output channel (downmixed, or split)."""
        if self.outputs == 1:
            mono = samples[:, 0] if self.channels == 1 else np.rint(
                samples.astype(np.float32).mean(axis=1)).astype(np.int16)
            parts = [self._resample(0, mono, last)]
        else:
            parts = [self._resample(c, samples[:, c], last) for c in range(self.outputs)]
        # Channels resample in step (same rate, same input length): one clock for all.
        n = min(len(p) for p in parts)
        if n == 0:
            return []
        start = self.next_sample
        self.next_sample += n
        self._received.append((self.next_sample, time.monotonic()))
        return [AudioBlock(start, p[:n].astype("<i2", copy=False).tobytes()) for p in parts]

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

    def _decode(self, data: memoryview) -> np.ndarray:
        raw = np.frombuffer(data, dtype=np.uint8 if self._width == 1 else "<i2")
        if self.encoding == "mulaw":
            return MULAW[raw]
        if self.encoding == "alaw":
            return ALAW[raw]
        return raw

    def _resample(self, channel: int, samples: np.ndarray, last: bool) -> np.ndarray:
        resampler = self._resamplers[channel]
        if resampler is None:
            return samples
        out = resampler.resample_chunk(samples.astype(np.float32) / 32768.0, last=last)
        return np.clip(np.rint(out * 32768.0), -32768, 32767).astype(np.int16)


__all__ = ["ALAW", "MULAW", "SessionAudio"]
