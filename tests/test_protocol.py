"""protocol.py without sockets: token extraction and key comparison."""

from __future__ import annotations

import pytest
from websockets.datastructures import Headers

from edge.protocol import key_matches, request_token


@pytest.mark.parametrize(
    ("headers", "token"),
    [
        ({"Authorization": "Token abc"}, "abc"),
        ({"Authorization": "token abc"}, "abc"),
        ({"Authorization": "Bearer abc"}, "abc"),
        ({"Authorization": "bearer  abc "}, "abc"),
        ({"Authorization": "Basic abc"}, None),
        ({"Authorization": "Token"}, None),
        ({"Sec-WebSocket-Protocol": "token, abc"}, "abc"),
        ({"Sec-WebSocket-Protocol": "abc, token"}, None),
        ({"Sec-WebSocket-Protocol": "token"}, None),
        ({}, None),
    ],
)
def test_request_token(headers: dict[str, str], token: str | None) -> None:
    assert request_token(Headers(headers)) == token


def test_key_matches() -> None:
    assert key_matches("b", ["a", "b"])
    assert not key_matches("c", ["a", "b"])
    assert not key_matches(None, ["a"])
    assert not key_matches("", ["a"])
    assert not key_matches("ab", ["a"])
