"""Passes (core/passes.py): signed, short-lived, one request each; anything else reads as no pass."""

from __future__ import annotations

import pytest

from core import passes

KEY = passes.derive_key(b"the installation's secret")
NOW = 1_800_000_000.0


def test_a_pass_names_its_client_and_pins():
    token = passes.mint(KEY, 7, group_id=3, key_id=11, replay_of=42, now=NOW)
    found = passes.verify(KEY, token, NOW + 1)
    assert (found.client_id, found.group_id, found.key_id, found.replay_of) == (7, 3, 11, 42)
    assert found.pinned and found.expires_at == NOW + passes.PASS_SECONDS
    bare = passes.verify(KEY, passes.mint(KEY, 7, now=NOW), NOW)
    assert not bare.pinned and bare.replay_of is None


@pytest.mark.parametrize(
    "token, at",
    [
        (passes.mint(KEY, 7, now=NOW), NOW + passes.PASS_SECONDS),  # expired
        (passes.mint(KEY, 7, now=NOW, seconds=3600), NOW),  # lives longer than any pass the UI makes
        (passes.mint(passes.derive_key(b"another secret"), 7, now=NOW), NOW),
        (passes.mint(KEY, 7, now=NOW).replace("krp1.", "krp2."), NOW),
        ("krp1." + passes.mint(KEY, 7, now=NOW).split(".")[1] + ".", NOW),
        ("", NOW),
        ("krp1.." + "A" * 43, NOW),
        ("x" * 5000, NOW),
    ],
    # Stable ids (the tokens hold random nonces): pytest-xdist's workers must collect the same tests.
    ids=["expired", "too long-lived", "other secret", "other version", "no mac", "empty", "no payload", "huge"],
)
def test_anything_but_a_fresh_pass_signed_with_the_key_is_no_pass(token, at):
    assert passes.verify(KEY, token, at) is None


def test_a_payload_changed_after_signing_is_no_pass():
    prefix, payload, mac = passes.mint(KEY, 7, now=NOW).split(".")
    other_payload = passes.mint(KEY, 8, now=NOW).split(".")[1]
    assert passes.verify(KEY, f"{prefix}.{other_payload}.{mac}", NOW) is None


def test_a_pass_serves_one_request():
    spent = passes.SpentPasses()
    found = passes.verify(KEY, passes.mint(KEY, 7, now=NOW), NOW)
    assert spent.spend(found, NOW) and not spent.spend(found, NOW + 1)


def test_the_pass_header_is_found_in_raw_fields():
    assert passes.pass_from(((b"Content-Type", b"x"), (b"X-Keyrotor-Pass", b"krp1.a.b"))) == "krp1.a.b"
    assert passes.pass_from(((b"authorization", b"Bearer k"),)) is None
