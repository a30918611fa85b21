"""The framed protocol between the daemon and its worker processes (sans-I/O, no NeMo):
the diarizer worker (edge/diarization/worker/) and the decoder process (edge/decode_process.py).

A message on the pipe is one frame:

    u32 length (big-endian, of everything after it, at most MAX_FRAME)
    u8  version (VERSION)   u8 kind (Kind)   u16 meta length (big-endian)
    meta: UTF-8 JSON object of scalars (stream id, sequence number, figures...)
    body: optional raw little-endian float32 array, its shape in meta["shape"]; or raw
          bytes (meta["bytes"]: true), such as a client's compressed audio

Arrays travel as raw bytes, never pickles: neither side ever unpickles what the other sent.
A version mismatch, an unknown kind or a malformed frame raises `WireError` (the engine then
treats the worker as broken and restarts it).

Daemon -> worker: LOAD {settings, generation, digests, warmup}, OPEN {sid}, AUDIO {sid, seq} + samples (n,),
CLOSE {sid}, STATS, SHUTDOWN.
Worker -> daemon: HELLO {version, pid}, PROGRESS {phase, done, total}, READY {figures},
FATAL {reason}, FRAMES {sid, seq, first, compute_s} + probs (n, 4),
CLOSED {sid, first} + probs, ERROR {sid, seq, reason}, STATS_REPLY {figures}.
OPEN has no reply when it succeeds: the engine sends a stream's AUDIO right behind its OPEN
without waiting, and a stream the worker could not open answers with ERROR {sid, seq: -1}.
`sid` names one stream in the worker (the engine's `session/stream-number`), so replies for a
stream that was dropped can be told from those of its successor.

Daemon -> decoder: OPEN {sid, format, packets, rate, channels, timeout_s, max_bytes},
BYTES {sid} + the client's bytes, END {sid}, CLOSE {sid}. Decoder -> daemon: PCM {sid, rate}
+ samples (n, channels), DECODED {sid, codec} (the end of one reply: the PCM frames before it
are what that BYTES or END completed), ERROR {sid, reason} (the stream is over).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import numpy as np

VERSION = 1
MAX_FRAME = 16 * 1024 * 1024  # a frame is at most a few seconds of audio; anything larger is corrupt
_LEN = struct.Struct(">I")
_HEAD = struct.Struct(">BBH")
DTYPE = np.dtype("<f4")


class Kind(IntEnum):
    # daemon -> worker
    LOAD = 1
    OPEN = 2
    AUDIO = 3
    CLOSE = 4
    STATS = 5
    SHUTDOWN = 6
    BYTES = 7  # daemon -> decoder
    END = 8  # daemon -> decoder
    # worker -> daemon
    HELLO = 16
    PROGRESS = 17
    READY = 18
    FATAL = 19
    # 20 was OPENED, a reply nothing waited for: not reused, so an older worker fails loudly.
    FRAMES = 21
    CLOSED = 22
    ERROR = 23
    STATS_REPLY = 24
    PCM = 25  # decoder -> daemon
    DECODED = 26  # decoder -> daemon


class WireError(ValueError):
    """A frame that does not follow this protocol (wrong version, kind, size or shape)."""


@dataclass(frozen=True)
class Message:
    kind: Kind
    meta: dict[str, Any] = field(default_factory=dict)
    array: np.ndarray | None = None
    data: bytes | None = None


def encode(kind: Kind, meta: dict[str, Any] | None = None, array: np.ndarray | None = None,
           data: bytes | None = None) -> bytes:
    """One frame, length prefix included. `array` is sent as float32, `data` as it is (one
    of the two at most).

    Raises `WireError` if the frame would exceed `MAX_FRAME` or the meta is too large.
    """
    meta = dict(meta or {})
    body = b""
    if data is not None:
        if array is not None:
            raise WireError("a frame carries an array or bytes, not both")
        meta["bytes"] = True
        body = data
    elif array is not None:
        arr = np.ascontiguousarray(array, dtype=DTYPE)
        meta["shape"] = list(arr.shape)
        body = arr.tobytes()
    head = json.dumps(meta, separators=(",", ":")).encode()
    if len(head) > 0xFFFF:
        raise WireError(f"meta too large ({len(head)} bytes)")
    size = _HEAD.size + len(head) + len(body)
    if size > MAX_FRAME:
        raise WireError(f"frame too large ({size} bytes)")
    return _LEN.pack(size) + _HEAD.pack(VERSION, int(kind), len(head)) + head + body


def frame_length(prefix: bytes) -> int:
    """The length announced by a 4-byte prefix. Raises `WireError` if out of bounds."""
    (size,) = _LEN.unpack(prefix)
    if not _HEAD.size <= size <= MAX_FRAME:
        raise WireError(f"bad frame length {size}")
    return size


def decode(payload: bytes) -> Message:
    """Parse what follows the length prefix. Raises `WireError` on anything malformed."""
    if len(payload) < _HEAD.size:
        raise WireError("truncated frame")
    version, kind, meta_len = _HEAD.unpack_from(payload)
    if version != VERSION:
        raise WireError(f"protocol version {version}, expected {VERSION}")
    try:
        kind_ = Kind(kind)
    except ValueError:
        raise WireError(f"unknown message kind {kind}") from None
    end = _HEAD.size + meta_len
    try:
        meta = json.loads(payload[_HEAD.size:end]) if meta_len else {}
    except ValueError as exc:
        raise WireError(f"bad meta: {exc}") from None
    if not isinstance(meta, dict):
        raise WireError("meta is not an object")
    body = payload[end:]
    array = None
    shape = meta.pop("shape", None)
    if meta.pop("bytes", False) is True:
        if shape is not None:
            raise WireError("a frame carries an array or bytes, not both")
        return Message(kind_, meta, None, bytes(body))
    if shape is not None:
        if not (isinstance(shape, list) and 1 <= len(shape) <= 2
                and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise WireError(f"bad shape {shape!r}")
        if int(np.prod(shape)) * DTYPE.itemsize != len(body):
            raise WireError(f"body of {len(body)} bytes does not match shape {shape}")
        array = np.frombuffer(body, dtype=DTYPE).reshape(shape).copy()  # owned and writable
    elif body:
        raise WireError("body without a shape")
    return Message(kind_, meta, array)


def read_message(read_exact: Any) -> Message | None:
    """Read one frame with a blocking `read_exact(n) -> bytes` (the worker's side).

    Returns None at a clean end of file (between frames). Raises `WireError` when the
    stream ends inside a frame or the frame is malformed.
    """
    prefix = read_exact(_LEN.size)
    if not prefix:
        return None
    if len(prefix) < _LEN.size:
        raise WireError("end of stream inside a frame")
    size = frame_length(prefix)
    payload = read_exact(size)
    if len(payload) < size:
        raise WireError("end of stream inside a frame")
    return decode(payload)


__all__ = ["MAX_FRAME", "VERSION", "Kind", "Message", "WireError", "decode", "encode",
           "frame_length", "read_message"]
