"""protocol.py without sockets: token extraction, key comparison, control messages."""

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
def test_request_token_is_read_from_the_headers(headers: dict[str, str], token: str | None) -> None:
    assert request_token(Headers(headers)) == token


def test_key_matches_only_an_exact_configured_key() -> None:
    assert key_matches("b", ["a", "b"])
    assert not key_matches("c", ["a", "b"])
    assert not key_matches(None, ["a"])
    assert not key_matches("", ["a"])
    assert not key_matches("ab", ["a"])


@pytest.mark.parametrize("text", ["[" * 100000, "[" * 3000, '{"type": "' + "x" * 5000 + '"}'])
def test_any_parse_failure_or_oversize_text_is_a_control_error(text: str) -> None:
    from edge.protocol import ControlError, parse_control

    with pytest.raises(ControlError) as err:
        parse_control(text)
    assert str(err.value)
