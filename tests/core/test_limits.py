"""Client limits decided over in-memory counters: plain functions and a Governor, no proxy."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from core.limits import (
    ClientPolicy,
    Governor,
    LimitError,
    Refusal,
    Ticket,
    duration,
    estimate_tokens,
    ip_allowed,
    model_allowed,
    networks_of,
    next_month,
    parse_limit,
    policy_with,
)
from storage.counters import MemoryCounters

NOW = datetime(2026, 12, 31, 23, 59, 0, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    "patterns, model, allowed",
    [
        ((), "anything", True),
        (("gpt-4o*",), "gpt-4o-mini", True),
        (("gpt-4o*",), "gpt-4o", True),
        (("gpt-4o*",), "gpt-4.1", False),
        (("gpt-4o",), "gpt-4o-mini", False),
        (("*-mini",), "o4-mini", True),
        (("a.b",), "aXb", False),  # a dot is a dot, not any character
        (("gpt-4o",), None, True),  # no model in the request: nothing to refuse
    ],
)
def test_model_allowlist(patterns, model, allowed):
    assert model_allowed(patterns, model) is allowed


@pytest.mark.parametrize(
    "ips, address, allowed",
    [
        ((), "203.0.113.9", True),
        (("10.0.0.0/8",), "10.1.2.3", True),
        (("10.0.0.0/8",), "11.1.2.3", False),
        (("127.0.0.1",), "::ffff:127.0.0.1", True),  # a dual-stack listener's view of a v4 client
        (("2001:db8::/32",), "2001:db8::1", True),
        (("2001:db8::/32",), "10.1.2.3", False),
        (("10.0.0.0/8",), None, False),
        (("10.0.0.0/8",), "not-an-ip", False),
    ],
)
def test_ip_allowlist(ips, address, allowed):
    assert ip_allowed(networks_of(ips), address) is allowed


@pytest.mark.parametrize(
    "name, text, value",
    [
        ("rpm", "60", 60),
        ("rpm", "none", None),
        ("models", "gpt-4o*, o3 ,gpt-4o*", ("gpt-4o*", "o3")),
        ("models", "none", ()),
        ("daily_usd", "$2.50", 2.5),
        ("expires_at", "2027-01-01", datetime(2027, 1, 1, tzinfo=UTC).timestamp()),
        ("expires_at", "2027-01-01T12:00+02:00", datetime(2027, 1, 1, 10, tzinfo=UTC).timestamp()),
        ("ips", "10.0.0.0/8,::1", ("10.0.0.0/8", "::1")),
    ],
)
def test_limits_parse_as_given(name, text, value):
    assert parse_limit(name, text) == value


@pytest.mark.parametrize(
    "name, text, says",
    [
        ("rpm", "0", "from 1"),
        ("tpm", "1.5", "whole number"),
        ("daily_usd", "-1", "above 0"),
        ("expires_at", "soon", "ISO date"),
        ("ips", "10.0.0.300", "not an IP"),
        ("groups", "nogroup", "UPSTREAM/GROUP"),
    ],
)
def test_bad_limits_say_why(name, text, says):
    with pytest.raises(LimitError, match=says):
        parse_limit(name, text)


def governor() -> Governor:
    return Governor(MemoryCounters())


def test_rpm_admits_exactly_n_in_a_moving_window_and_says_when_to_retry():
    g, policy = governor(), ClientPolicy(rpm=3)
    outcomes = [g.admit(f"f{i}", 1, policy, None, b"", None, NOW + i) for i in range(5)]
    assert [type(o) for o in outcomes] == [Ticket, Ticket, Ticket, Refusal, Refusal]
    refusal = outcomes[3]
    assert refusal.code == "rate_limit_exceeded" and refusal.error.status == 429
    assert refusal.error.headers["retry-after"] == "57"  # the first leaves the window at NOW + 60
    assert refusal.error.headers["x-ratelimit-remaining-requests"] == "0"
    assert isinstance(g.admit("late", 1, policy, None, b"", None, NOW + 60.5), Ticket)
    assert isinstance(g.admit("other client", 2, policy, None, b"", None, NOW + 3), Ticket)


def test_tpm_reserves_the_estimate_and_settles_to_what_was_reported():
    g, policy = governor(), ClientPolicy(tpm=1000)
    body = b'{"model": "m", "max_tokens": 500, "messages": []}'
    assert estimate_tokens(body) == len(body) // 4 + 500
    assert isinstance(g.admit("a", 1, policy, None, body, None, NOW), Ticket)
    assert isinstance(g.admit("b", 1, policy, None, b"x" * 2000, None, NOW), Refusal)  # 512 + 500 would pass 1000
    g.settle("a", {"total_tokens": 30}, None, NOW + 1)
    assert isinstance(g.admit("b", 1, policy, None, b"x" * 2000, None, NOW + 1), Ticket)
    assert g.rate_headers(1, policy, NOW + 1)["x-ratelimit-remaining-tokens"] == str(1000 - 30 - 500)


def test_budget_lets_the_admitted_request_finish_and_refuses_the_next_until_it_renews():
    g, policy = governor(), ClientPolicy(monthly_tokens=100, daily_usd=1.0)
    assert isinstance(g.admit("a", 1, policy, None, b"", None, NOW), Ticket)
    assert isinstance(g.admit("b", 1, policy, None, b"", None, NOW), Ticket)  # both under budget when admitted
    g.settle("a", {"total_tokens": 80}, 0.1, NOW)
    g.settle("b", {"total_tokens": 80}, 0.1, NOW)
    refusal = g.admit("c", 1, policy, None, b"", None, NOW)
    assert refusal.code == "insufficient_quota" and refusal.error.status == 429
    assert "monthly token budget of 100 tokens is spent (160 tokens)" in refusal.error.message
    assert "renews at 2027-01-01T00:00:00Z" in refusal.error.message
    assert refusal.error.headers["x-should-retry"] == "false"
    assert isinstance(g.admit("d", 1, policy, None, b"", None, next_month(NOW)), Ticket)


def test_parallel_slots_free_when_requests_end():
    g, policy = governor(), ClientPolicy(max_parallel=2)
    assert isinstance(g.admit("a", 1, policy, None, b"", None, NOW), Ticket)
    assert isinstance(g.admit("b", 1, policy, None, b"", None, NOW), Ticket)
    assert isinstance(g.admit("c", 1, policy, None, b"", None, NOW), Refusal)
    g.settle("a", None, None, NOW)
    g.settle("a", None, None, NOW)  # settling twice frees one slot only
    assert isinstance(g.admit("c", 1, policy, None, b"", None, NOW), Ticket)
    assert isinstance(g.admit("d", 1, policy, None, b"", None, NOW), Refusal)


def test_a_refused_request_takes_nothing_from_the_other_limits():
    g, policy = governor(), ClientPolicy(rpm=1, tpm=10)
    assert isinstance(g.admit("big", 1, policy, None, b"x" * 400, None, NOW), Ticket)  # the estimate is capped at tpm
    assert g.admit("next", 1, ClientPolicy(rpm=5, tpm=10), None, b"x" * 8, None, NOW).code == "rate_limit_exceeded"
    assert g.rate_headers(1, ClientPolicy(rpm=5), NOW)["x-ratelimit-remaining-requests"] == "4"


def test_expiry_and_address_are_checked_at_the_headers():
    policy = ClientPolicy(expires_at=NOW, ips=("10.0.0.0/8",))
    assert Governor.check_key(policy, networks_of(policy.ips), "10.0.0.1", NOW - 1) is None
    assert Governor.check_key(policy, networks_of(policy.ips), "10.0.0.1", NOW).code == "key_expired"
    refusal = Governor.check_key(ClientPolicy(ips=("10.0.0.0/8",)), networks_of(("10.0.0.0/8",)), "1.2.3.4", NOW)
    assert (refusal.code, refusal.error.status) == ("ip_not_allowed", 403)


def test_model_refusal_names_the_model():
    refusal = governor().admit("a", 1, ClientPolicy(models=("gpt-4o*",)), "o3", b"", None, NOW)
    assert (refusal.code, refusal.error.status) == ("model_not_allowed", 403)
    assert "'o3'" in refusal.error.message


@pytest.mark.parametrize(
    "seconds, text", [(0.02, "20ms"), (1.5, "1.5s"), (59.9991, "60s"), (360, "6m0s"), (61.2, "1m2s")]
)
def test_reset_durations_read_like_openais(seconds, text):
    assert duration(seconds) == text


def test_no_limits_takes_no_ticket():
    assert governor().admit("a", 1, ClientPolicy(), "gpt-4o", b"{}", None, NOW) is None
    assert policy_with(ClientPolicy(rpm=5), {"rpm": "none", "tpm": "9"}) == ClientPolicy(tpm=9)
