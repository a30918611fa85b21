"""protocol.py without sockets: token extraction and key comparison."""

from __future__ import annotations

import pytest
from websockets.datastructures import Headers

from edge.protocol import AuthThrottle, key_matches, request_token


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


def test_auth_throttle_window() -> None:
    t = AuthThrottle(max_failures=3, window_s=10, max_addresses=2)
    for i in range(3):
        assert not t.blocked("a", i)
        t.failed("a", i)
    assert t.blocked("a", 3) and not t.blocked("b", 3)
    assert t.blocked("a", 9.5)  # all three failures still inside the window
    assert not t.blocked("a", 10.5)  # the first one slid out: 2 < 3
    # bounded memory: a third address evicts the least recently failed one
    t.failed("a", 20)
    t.failed("b", 21)
    t.failed("c", 22)
    assert set(t._failures) == {"b", "c"}


@pytest.mark.parametrize("text", ["[" * 100000, "[" * 3000, '{"type": "' + "x" * 5000 + '"}'])
def test_any_parse_failure_or_oversize_text_is_a_control_error(text: str) -> None:
    from edge.protocol import ControlError, parse_control

    with pytest.raises(ControlError) as err:
        parse_control(text)
    assert str(err.value)


def test_ipv6_failures_count_per_64_so_a_host_cannot_rotate_through_its_prefix() -> None:
    from edge.protocol import throttle_key

    assert throttle_key("2001:db8:1:2::1") == throttle_key("2001:db8:1:2:ffff::9")
    assert throttle_key("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert throttle_key("2001:db8:1:3::1") != throttle_key("2001:db8:1:2::1")
    assert throttle_key("::ffff:192.0.2.7") == throttle_key("192.0.2.7") == "192.0.2.7"
    assert throttle_key("fe80::1%eth0") == "fe80::/64"
    t = AuthThrottle(max_failures=3, window_s=10)
    for i in range(3):
        t.failed(throttle_key(f"2001:db8::{i + 1:x}"), 0)
    assert t.blocked(throttle_key("2001:db8::ffff"), 1)
