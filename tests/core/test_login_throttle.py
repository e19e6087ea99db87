"""The login throttle alone: per address (IPv6 by /64), one held answer at a time, locked after LOCK_AFTER."""

from __future__ import annotations

import pytest

from core.login_throttle import (
    FREE_FAILURES,
    LOCK_AFTER,
    LOCK_SECONDS,
    MAX_DELAY_SECONDS,
    LoginThrottle,
    counted_as,
)

NOW = 1_800_000_000.0


@pytest.mark.parametrize(
    ("address", "bucket"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),  # the same host's other address
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),  # the next /64 is another host
        ("::ffff:192.0.2.7", "192.0.2.7"),  # an IPv4 client on a dual-stack socket
        ("unknown", "unknown"),
    ],
)
def test_addresses_are_counted_by_host(address: str, bucket: str):
    assert counted_as(address) == bucket


def test_failures_are_free_then_held_then_locked_and_only_for_their_address():
    throttle = LoginThrottle()
    delays = [throttle.failed("a", NOW + i * 10) for i in range(LOCK_AFTER)]
    assert delays[:FREE_FAILURES] == [0.0] * FREE_FAILURES
    assert delays[FREE_FAILURES:] == sorted(delays[FREE_FAILURES:]) and 0 < delays[FREE_FAILURES] <= MAX_DELAY_SECONDS
    last = NOW + (LOCK_AFTER - 1) * 10
    assert throttle.retry_after("a", last) == LOCK_SECONDS
    assert throttle.retry_after("b", last) is None and throttle.busy("b", last) is None  # another address: untouched
    assert throttle.busy("a", last) is not None  # the last wrong key's answer is still held
    assert throttle.busy("a", last + MAX_DELAY_SECONDS) is None
    throttle.succeeded("a")
    assert throttle.retry_after("a", last) is None and throttle.failed("a", last) == 0.0


def test_an_ipv6_host_cannot_escape_its_count_by_changing_its_interface_id():
    throttle = LoginThrottle()
    for i in range(LOCK_AFTER):
        throttle.failed(f"2001:db8::{i + 1:x}", NOW + i * 10)
    assert throttle.retry_after("2001:db8::ffff", NOW + 60) is not None
    assert throttle.retry_after("2001:db8:0:1::1", NOW + 60) is None
