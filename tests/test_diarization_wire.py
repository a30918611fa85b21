"""The worker protocol's framing (edge/diarization/wire.py): round trips, raw audio, refused frames."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest

from edge.diarization import wire
from edge.diarization.wire import Kind


def roundtrip(data: bytes) -> wire.Message | None:
    return wire.read_message(io.BytesIO(data).read)


def test_frames_roundtrip_meta_and_float32_arrays() -> None:
    probs = np.random.default_rng(1).random((7, 4)).astype(np.float32)
    msg = roundtrip(wire.encode(Kind.FRAMES, {"sid": "a/1", "seq": 3, "first": 12}, probs))
    assert msg is not None and msg.kind is Kind.FRAMES
    assert msg.meta == {"sid": "a/1", "seq": 3, "first": 12}
    assert msg.array is not None and msg.array.dtype == np.float32
    np.testing.assert_array_equal(msg.array, probs)
    empty = roundtrip(wire.encode(Kind.CLOSED, {"sid": "a/1"}, np.zeros((0, 4))))
    assert empty is not None and empty.array is not None and empty.array.shape == (0, 4)
    bare = roundtrip(wire.encode(Kind.STATS))
    assert bare == wire.Message(Kind.STATS, {}, None)
    assert roundtrip(b"") is None  # clean end of input


def test_audio_travels_as_raw_bytes_not_pickles() -> None:
    samples = np.linspace(-1, 1, 5120, dtype=np.float32)
    data = wire.encode(Kind.AUDIO, {"sid": "s/0", "seq": 1}, samples)
    assert b"\x80\x04" not in data[:16]  # no pickle protocol header
    assert len(data) == 4 + 4 + len(b'{"sid":"s/0","seq":1,"shape":[5120]}') + 5120 * 4


def header(version: int, kind: int, meta: bytes, body: bytes = b"") -> bytes:
    payload = struct.pack(">BBH", version, kind, len(meta)) + meta + body
    return struct.pack(">I", len(payload)) + payload


@pytest.mark.parametrize(("data", "error"), [
    (header(2, 1, b"{}"), "version 2"),
    (header(1, 99, b"{}"), "unknown message kind 99"),
    (header(1, 1, b"[1]"), "not an object"),
    (header(1, 1, b"{bad"), "bad meta"),
    (header(1, 21, b'{"shape":[2,4]}', b"\0" * 12), "does not match shape"),
    (header(1, 21, b'{"shape":[2,4,1]}', b"\0" * 32), "bad shape"),
    (header(1, 21, b"{}", b"\0" * 4), "body without a shape"),
    (struct.pack(">I", wire.MAX_FRAME + 1), "bad frame length"),
    (header(1, 1, b"{}")[:-1], "inside a frame"),
    (b"\0\0", "inside a frame"),
])
def test_malformed_frames_are_refused(data: bytes, error: str) -> None:
    with pytest.raises(wire.WireError, match=error):
        roundtrip(data)


def test_oversized_frames_cannot_be_built() -> None:
    with pytest.raises(wire.WireError, match="too large"):
        wire.encode(Kind.AUDIO, {}, np.zeros(wire.MAX_FRAME // 4 + 1, np.float32))


def test_bytes_travel_as_they_are_and_never_with_an_array() -> None:
    """The decoder process's BYTES: a client's compressed audio, byte for byte (any bytes,
    including a frame's worth of zeros or an Ogg page), and no array besides."""
    payload = b"OggS\x00\x02" + bytes(range(256)) * 40
    msg = roundtrip(wire.encode(Kind.BYTES, {"sid": "7"}, data=payload))
    assert msg is not None and msg.kind is Kind.BYTES
    assert msg.meta == {"sid": "7"} and msg.data == payload and msg.array is None
    empty = roundtrip(wire.encode(Kind.BYTES, {"sid": "7"}, data=b""))
    assert empty is not None and empty.data == b""
    with pytest.raises(wire.WireError, match="not both"):
        wire.encode(Kind.BYTES, {}, np.zeros(3), data=b"x")
    meta = b'{"bytes":true,"shape":[1]}'
    with pytest.raises(wire.WireError, match="not both"):
        wire.decode(struct.pack(">BBH", wire.VERSION, int(Kind.BYTES), len(meta)) + meta + b"abcd")
