"""What the first bytes of a stream say, and the audio that needs no codec (pure, no PyAV).

`sniff()` names the container (bytes in -> FFmpeg format name, None, or `NEED_MORE`);
`parse_wav_header()` reads a RIFF/RF64 WAVE header; `WavDecoder` turns the samples after it
into `Pcm` with numpy. The G.711 tables serve both WAV and the raw `mulaw`/`alaw` encodings.
Everything compressed goes to edge/decode.py (PyAV).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol

import numpy as np

NEED_MORE: Final = "need-more"
SNIFF_BYTES = 4096  # the most `sniff()` ever waits for before deciding "no container"
FORMAT_NAMES = {
    "ogg": "Ogg", "matroska": "WebM/Matroska", "wav": "WAV", "flac": "FLAC", "mp3": "MP3",
    "aac": "AAC (ADTS)", "mov": "MP4", "amrnb": "AMR-NB", "amrwb": "AMR-WB", "g729": "G.729",
}


class DecodeError(Exception):
    """The audio cannot be decoded; `str()` says what was wrong, for the client."""


class DecoderLost(DecodeError):
    """Not the audio: the decoder itself is gone (its process died, hung or could not start).
    The session ends with 1011 after the finals for the audio decoded before it."""


@dataclass(frozen=True)
class Pcm:
    """Decoded audio: float32 in [-1, 1], shape (samples, channels), at `rate` Hz."""

    samples: np.ndarray
    rate: int


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
# --- sniffing (pure) ----------------------------------------------------------------------

_MP3_BITRATES_V1_L3 = (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320)
_MP3_BITRATES_V2_L3 = (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160)
_MP3_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}
_ADTS_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025,
               8000, 7350)


def _mp3_frame_len(h: bytes) -> int | None:
    """Length of the MPEG layer III frame whose 4-byte header is `h`, or None."""
    if h[0] != 0xFF or h[1] & 0xE0 != 0xE0:
        return None
    version, layer = (h[1] >> 3) & 3, (h[1] >> 1) & 3
    bitrate_i, rate_i, padding = h[2] >> 4, (h[2] >> 2) & 3, (h[2] >> 1) & 1
    if version == 1 or layer != 1 or bitrate_i in (0, 15) or rate_i == 3:
        return None  # reserved version, not layer III, free/bad bitrate, reserved rate
    rate = _MP3_RATES[version][rate_i]
    if version == 3:
        return 144 * _MP3_BITRATES_V1_L3[bitrate_i] * 1000 // rate + padding
    return 72 * _MP3_BITRATES_V2_L3[bitrate_i] * 1000 // rate + padding


def _adts_frame_len(h: bytes) -> int | None:
    """Length of the ADTS frame whose 7-byte header is `h`, or None."""
    if h[0] != 0xFF or h[1] & 0xF6 != 0xF0:  # sync, layer 00
        return None
    if (h[2] >> 2) & 0xF >= len(_ADTS_RATES):
        return None
    length = ((h[3] & 3) << 11) | (h[4] << 3) | (h[5] >> 5)
    return length if length >= 7 else None


def _two_frames(head: bytes, frame_len: Callable[[bytes], int | None], size: int) -> str | None:
    """"ok" if `head` starts with two consecutive frames, NEED_MORE if too short to tell."""
    first = frame_len(head[:size])
    if first is None:
        return None
    if len(head) < first + size:
        return NEED_MORE if len(head) < SNIFF_BYTES else None
    return "ok" if frame_len(head[first:first + size]) is not None else None


def sniff(head: bytes) -> str | None:
    """The FFmpeg format of a stream starting with `head`, None if it is no container we know
    (raw audio), or NEED_MORE if `head` is too short to tell (at most SNIFF_BYTES are needed).

    A bare MP3/ADTS frame sync must be followed by a second frame header where the first
    frame ends: raw linear16 often starts with bytes that look like one sync word.
    """
    if len(head) < 12:
        return NEED_MORE
    if head[:4] == b"OggS":
        return "ogg"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"
    if head[:4] in (b"RIFF", b"RF64") and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:3] == b"ID3":
        return "mp3"
    if head[4:8] == b"ftyp":
        return "mov"
    for fmt, frame_len, size in (("mp3", _mp3_frame_len, 4), ("aac", _adts_frame_len, 7)):
        found = _two_frames(head, frame_len, size)
        if found == "ok":
            return fmt
        if found == NEED_MORE:
            return NEED_MORE
    return None


# --- WAV (pure: the header is parsed here, the samples need no codec) ----------------------

MAX_WAV_HEADER = 1 << 16  # fmt + LIST/INFO chunks etc. before "data"
# format tag -> our name; 0xFFFE (extensible) carries the tag in its sub-format GUID.
_WAV_TAGS = {1: "pcm", 3: "float", 6: "alaw", 7: "mulaw"}
_WAV_DTYPES = {("pcm", 8): "u1", ("pcm", 16): "<i2", ("pcm", 32): "<i4", ("float", 32): "<f4",
               ("float", 64): "<f8", ("alaw", 8): "u1", ("mulaw", 8): "u1"}


@dataclass(frozen=True)
class WavFormat:
    """What a RIFF/RF64 WAVE header says: sample coding, channels, rate; where data starts."""

    coding: str  # pcm | float | alaw | mulaw
    bits: int
    channels: int
    rate: int
    data_offset: int


def parse_wav_header(head: bytes) -> WavFormat | str | None:
    """The WavFormat of a stream starting with `head` (RIFF or RF64 WAVE), NEED_MORE while the
    header is incomplete, or None for a coding numpy cannot read as is (ADPCM, 24-bit, ...:
    FFmpeg decodes those). Chunk sizes other than fmt's are not trusted: streamed WAVs carry
    0 or 0xFFFFFFFF as the RIFF and data sizes, so the data runs to the end of the stream.
    Raises DecodeError for a malformed header."""
    fmt: tuple[str | None, int, int, int] | None = None
    pos = 12
    while True:
        if pos > MAX_WAV_HEADER:
            raise DecodeError(f"the WAV header has no data chunk in its first {MAX_WAV_HEADER}"
                              " bytes")
        if len(head) < pos + 8:
            return NEED_MORE
        chunk, size = head[pos:pos + 4], int.from_bytes(head[pos + 4:pos + 8], "little")
        body = pos + 8
        if chunk == b"data":
            if fmt is None:
                raise DecodeError("the WAV data chunk comes before its fmt chunk")
            coding, bits, channels, rate = fmt
            if coding is None or (coding, bits) not in _WAV_DTYPES:
                return None
            return WavFormat(coding, bits, channels, rate, body)
        if chunk == b"fmt ":
            if size < 16:
                raise DecodeError(f"the WAV fmt chunk is {size} bytes (at least 16 expected)")
            if len(head) < body + min(size, 26):
                return NEED_MORE
            tag = int.from_bytes(head[body:body + 2], "little")
            channels = int.from_bytes(head[body + 2:body + 4], "little")
            rate = int.from_bytes(head[body + 4:body + 8], "little")
            bits = int.from_bytes(head[body + 14:body + 16], "little")
            if tag == 0xFFFE and size >= 26:
                tag = int.from_bytes(head[body + 24:body + 26], "little")
            if not 1 <= channels <= 64 or not 1000 <= rate <= 384000:
                raise DecodeError(f"the WAV header says {channels} channels at {rate} Hz "
                                  "(1-64 channels at 1000-384000 Hz expected)")
            fmt = (_WAV_TAGS.get(tag), bits, channels, rate)
        pos = body + size + (size & 1)


class WavDecoder:
    """WAV samples after a parsed header: numpy on the loop (no codec, microseconds).
    A sample frame split across client frames is carried, never dropped."""

    name = "WAV"

    def __init__(self, fmt: WavFormat) -> None:
        self.fmt = fmt
        self.codec = f"{fmt.coding}{fmt.bits}"
        self.decoded_samples = 0
        self._dtype = np.dtype(_WAV_DTYPES[(fmt.coding, fmt.bits)])
        self._frame = self._dtype.itemsize * fmt.channels
        self._carry = b""

    async def feed(self, data: bytes) -> list[Pcm]:
        data = self._carry + data
        usable = len(data) - len(data) % self._frame
        self._carry = data[usable:]
        if not usable:
            return []
        raw = np.frombuffer(data, dtype=self._dtype, count=usable // self._dtype.itemsize)
        coding = self.fmt.coding
        if coding == "mulaw":
            samples = MULAW[raw].astype(np.float32) / 32768
        elif coding == "alaw":
            samples = ALAW[raw].astype(np.float32) / 32768
        elif coding == "float":
            samples = raw.astype(np.float32)
        elif self.fmt.bits == 8:  # 8-bit WAV is unsigned
            samples = (raw.astype(np.float32) - 128) / 128
        else:
            samples = raw.astype(np.float32) / float(2 ** (self.fmt.bits - 1))
        pcm = samples.reshape(-1, self.fmt.channels)
        self.decoded_samples += pcm.shape[0]
        return [Pcm(pcm, self.fmt.rate)]

    async def finish(self) -> list[Pcm]:
        if not self.decoded_samples:
            raise DecodeError("the WAV stream ended before any audio was decoded "
                              "(truncated or empty)")
        return []

    def close(self) -> None:
        """Nothing to stop: no thread."""


class Decoder(Protocol):
    """What SessionAudio needs of a decoder (StreamDecoder, WavDecoder)."""

    name: str
    codec: str | None
    decoded_samples: int

    async def feed(self, data: bytes) -> list[Pcm]: ...
    async def finish(self) -> list[Pcm]: ...
    def close(self) -> None: ...


__all__ = ["ALAW", "FORMAT_NAMES", "MULAW", "NEED_MORE", "SNIFF_BYTES", "DecodeError", "Decoder",
           "DecoderLost",
           "Pcm", "WavDecoder", "WavFormat", "parse_wav_header", "sniff"]
