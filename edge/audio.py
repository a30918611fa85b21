"""Device audio -> the session clock: decode, resample once to 16 kHz, count samples.

The session clock is the number of 16 kHz samples produced since the session's first byte;
every time in the daemon (upstream offsets, diarizer frames, Results) is seconds on it.
`SessionAudio.feed()` takes frames of any length in the declared encoding and returns
`AudioBlock`s placed on that clock. An odd byte of linear16 (or a split sample) is carried
to the next frame, never dropped.
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

    def __init__(self, encoding: str, sample_rate: int, history_s: float = 120.0) -> None:
        if encoding not in BYTES_PER_SAMPLE:
            raise ValueError(f"unsupported encoding {encoding!r}")
        self.encoding = encoding
        self.sample_rate = sample_rate
        self._width = BYTES_PER_SAMPLE[encoding]
        self._carry = b""
        self._resampler = (
            None
            if sample_rate == SAMPLE_RATE
            else soxr.ResampleStream(sample_rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
        )
        self._sha = hashlib.sha256()
        self.received_bytes = 0
        self.next_sample = 0  # the session clock, in 16 kHz samples
        # (end sample, monotonic receive time) per block, for "word end -> sent" latency.
        self._received: deque[tuple[int, float]] = deque(maxlen=max(16, int(history_s * 50)))

    @property
    def duration(self) -> float:
        """Seconds of audio received, at the device's own rate."""
        return self.received_bytes // self._width / self.sample_rate

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()

    @property
    def clock(self) -> float:
        """The session clock now: seconds of 16 kHz audio produced."""
        return self.next_sample / SAMPLE_RATE

    def feed(self, data: bytes) -> AudioBlock | None:
        """Decode one device frame; returns the new 16 kHz audio (None if none was produced)."""
        self._sha.update(data)
        self.received_bytes += len(data)
        if self._carry:
            data = self._carry + data
        usable = len(data) - len(data) % self._width
        self._carry = data[usable:]
        if not usable:
            return None
        samples = self._decode(memoryview(data)[:usable])
        return self._place(self._resample(samples, last=False))

    def flush(self) -> AudioBlock | None:
        """End of audio: the resampler's tail (an unpaired trailing byte is dropped here,
        the only place a partial sample can go — it is not a sample)."""
        self._carry = b""
        if self._resampler is None:
            return None
        return self._place(self._resample(np.zeros(0, np.int16), last=True))

    def received_at(self, t: float) -> float | None:
        """Monotonic time at which the audio at session time `t` arrived (None if unknown)."""
        sample = int(t * SAMPLE_RATE)
        for end, when in self._received:
            if end >= sample:
                return when
        return None

    def _decode(self, data: memoryview) -> np.ndarray:
        raw = np.frombuffer(data, dtype=np.uint8 if self._width == 1 else "<i2")
        if self.encoding == "mulaw":
            return MULAW[raw]
        if self.encoding == "alaw":
            return ALAW[raw]
        return raw

    def _resample(self, samples: np.ndarray, last: bool) -> np.ndarray:
        if self._resampler is None:
            return samples
        out = self._resampler.resample_chunk(samples.astype(np.float32) / 32768.0, last=last)
        return np.clip(np.rint(out * 32768.0), -32768, 32767).astype(np.int16)

    def _place(self, pcm: np.ndarray) -> AudioBlock | None:
        if pcm.size == 0:
            return None
        block = AudioBlock(self.next_sample, pcm.astype("<i2", copy=False).tobytes())
        self.next_sample = block.end
        self._received.append((block.end, time.monotonic()))
        return block


__all__ = ["ALAW", "MULAW", "SessionAudio"]
