"""Guessing the admin key: counted per client address (X-Forwarded-For only from trusted proxies),
by the login form and by Bearer alike, and never locking the right key out."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from config import load_settings
from core import login_throttle
from core.addresses import client_address, parse_networks
from monitor_ui.app import create_app
from storage import db

ADMIN = "kra-test-admin-key-0123456789abcdef"
PROXY = "10.0.0.1"  # the reverse proxy in front, when one is trusted
Make = Callable[..., TestClient]


@pytest.fixture
def make_client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Make]:
    """A UI app with these settings overrides, seen from `peer`; the guessers' waits shortened."""
    monkeypatch.setenv("KEYROTOR_ADMIN_KEY", ADMIN)
    monkeypatch.delenv("KEYROTOR_SECRET", raising=False)
    monkeypatch.setattr(login_throttle, "FIRST_DELAY_SECONDS", 0.001)
    monkeypatch.setattr(login_throttle, "MAX_DELAY_SECONDS", 0.01)
    opened: list[TestClient] = []

    def make(peer: str = "192.0.2.10", **overrides: str) -> TestClient:
        settings = load_settings(overrides={"storage.path": str(tmp_path / "kr.db"), **overrides}, environ={})
        db.ensure_database(settings.storage_path)
        client = TestClient(create_app(settings), follow_redirects=False, client=(peer, 50000))
        client.__enter__()
        client.db_path = settings.storage_path  # type: ignore[attr-defined]
        opened.append(client)
        return client

    yield make
    for client in opened:
        client.__exit__(None, None, None)


def guess(client: TestClient, forwarded_for: str | None = None, key: str = "wrong-guess") -> int:
    headers = {"x-forwarded-for": forwarded_for} if forwarded_for else {}
    return client.post("/login", data={"admin_key": key}, headers=headers).status_code


def audit_addresses(client: TestClient) -> list[tuple[str, str]]:
    conn = db.connect(client.db_path)  # type: ignore[attr-defined]
    try:
        return [(r[0], r[1]) for r in conn.execute("SELECT action, address FROM audit_log ORDER BY id")]
    finally:
        conn.close()


def test_forwarded_for_from_an_untrusted_peer_is_ignored(make_client: Make):
    client = make_client(peer="192.0.2.10")  # no trusted proxies: a spoofed header changes nothing
    assert [guess(client, forwarded_for=f"198.51.100.{i}") for i in range(6)] == [401] * 6
    assert guess(client, forwarded_for="198.51.100.99") == 429  # every guess counted on the real peer
    assert {address for _, address in audit_addresses(client)} == {"192.0.2.10"}


def test_forwarded_for_from_a_peer_not_listed_is_ignored_though_others_are_trusted(make_client: Make):
    client = make_client(peer="192.0.2.10", **{"ui.trusted_proxies": PROXY})
    assert [guess(client, forwarded_for=f"198.51.100.{i}") for i in range(6)] == [401] * 6
    assert guess(client, forwarded_for="198.51.100.99") == 429


def test_forwarded_for_from_a_trusted_proxy_names_the_client(make_client: Make):
    client = make_client(peer=PROXY, **{"ui.trusted_proxies": "10.0.0.0/8"})
    # What the client wrote itself stands left of what the proxy appended: the rightmost untrusted hop counts.
    statuses = [guess(client, forwarded_for=f"203.0.113.{i}, 198.51.100.7") for i in range(6)]
    assert statuses == [401] * 6
    assert guess(client, forwarded_for="198.51.100.7") == 429
    assert guess(client, forwarded_for="198.51.100.8") == 401  # another client behind the same proxy
    assert guess(client, forwarded_for="198.51.100.8, 10.0.0.9") == 401  # a second trusted hop is skipped
    addresses = [address for _, address in audit_addresses(client)]
    assert addresses == ["198.51.100.7"] * 7 + ["198.51.100.8"] * 2


def test_wrong_bearer_keys_are_throttled_like_logins(make_client: Make):
    client = make_client()
    wrong = {"authorization": "Bearer kra-wrong-guess-000000000000"}
    assert [client.get("/api/clients", headers=wrong).status_code for _ in range(6)] == [401] * 6
    refused = client.get("/api/clients", headers=wrong)
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    assert refused.headers["content-type"].startswith("application/json")
    assert client.post("/api/clients", json={"name": "x"}, headers=wrong).status_code == 429  # changes too
    assert client.get("/metrics", headers=wrong).status_code == 429
    assert guess(client) == 429  # one count per address, whichever way the guesses came
    assert [action for action, _ in audit_addresses(client)] == ["login.failed"] * 6 + ["login.refused"] * 4


def test_the_right_key_is_never_refused_at_a_locked_address(make_client: Make):
    client = make_client()
    right = {"authorization": f"Bearer {ADMIN}"}
    for _ in range(8):
        guess(client)
    assert guess(client) == 429
    assert client.get("/api/clients", headers=right).status_code == 200
    assert guess(client) == 429  # a Bearer success is no login: the lock on wrong keys stays
    assert guess(client, key=ADMIN) == 303  # the form with the right key: in, and the count cleared
    assert guess(client) == 401


@pytest.mark.parametrize(
    ("peer", "forwarded", "trusted", "expected"),
    [
        ("192.0.2.1", ["6.6.6.6"], "", "192.0.2.1"),
        ("192.0.2.1", ["6.6.6.6"], "10.0.0.0/8", "192.0.2.1"),
        ("10.0.0.1", ["6.6.6.6"], "10.0.0.0/8", "6.6.6.6"),
        ("10.0.0.1", ["1.1.1.1, 6.6.6.6"], "10.0.0.0/8", "6.6.6.6"),
        ("10.0.0.1", ["1.1.1.1", "6.6.6.6, 10.2.3.4"], "10.0.0.0/8", "6.6.6.6"),
        ("10.0.0.1", [], "10.0.0.0/8", "10.0.0.1"),
        ("10.0.0.1", ["10.0.0.2"], "10.0.0.0/8", "10.0.0.2"),  # only proxies: the leftmost
        ("10.0.0.1", ["not-an-address"], "10.0.0.0/8", "10.0.0.1"),
        ("10.0.0.1", ["6.6.6.6:4711"], "10.0.0.0/8", "6.6.6.6"),
        ("::1", ["2001:db8::5"], "::1", "2001:db8::5"),
    ],
)
def test_client_address(peer: str, forwarded: list[str], trusted: str, expected: str):
    assert client_address(peer, forwarded, parse_networks(trusted)) == expected


@pytest.mark.parametrize("value", ["10.0.0.1 nonsense", "300.1.1.1", 5])
def test_trusted_proxies_refuses_what_is_no_address(value: object):
    with pytest.raises(ValueError):
        parse_networks(value)


def same_app_from(client: TestClient, peer: str) -> TestClient:
    """Another browser, at `peer`, on the same running UI as `client`."""
    other = TestClient(client.app, follow_redirects=False, client=(peer, 50001))
    other.__enter__()
    return other


def test_the_right_key_from_another_address_passes_at_once_while_one_address_is_locked(make_client: Make):
    guesser = make_client(peer="192.0.2.66")
    assert [guess(guesser) for _ in range(6)] == [401] * 6
    assert guess(guesser) == 429
    admin = same_app_from(guesser, "198.51.100.5")
    try:
        before = len(audit_addresses(guesser))
        assert guess(admin, key=ADMIN) == 303
        assert admin.get("/api/clients", headers={"authorization": f"Bearer {ADMIN}"}).status_code == 200
        assert guess(admin) == 401  # its own first wrong key: counted for it alone, not refused
        assert audit_addresses(guesser)[before:] == [
            ("login.succeeded", "198.51.100.5"),
            ("login.failed", "198.51.100.5"),
        ]
        assert guess(guesser) == 429  # the guesser stays locked
    finally:
        admin.__exit__(None, None, None)


def test_the_login_page_shows_the_wait_never_json(make_client: Make):
    client = make_client()
    for _ in range(6):
        guess(client)
    refused = client.post("/login", data={"admin_key": "wrong-again"})
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    assert refused.headers["content-type"].startswith("text/html")
    assert "Too many wrong admin keys from this address: wait" in refused.text
    assert re.search(r"until \d\d:\d\d:\d\d UTC", refused.text)
    assert '<input type="password" name="admin_key"' in refused.text  # the form is there to try again later
    assert "wrong-again" not in refused.text  # what was typed is not echoed
    page = client.get("/login")
    assert page.status_code == 200 and "Too many wrong admin keys from this address: wait" in page.text
    elsewhere = same_app_from(client, "198.51.100.5")
    try:
        assert "Too many wrong admin keys" not in elsewhere.get("/login").text
    finally:
        elsewhere.__exit__(None, None, None)
    assert guess(client, key=ADMIN) == 303  # the right key, at the locked address: still in


def test_a_session_is_never_counted_or_held_at_a_locked_address(make_client: Make):
    client = make_client()
    assert guess(client, key=ADMIN) == 303  # a session first, its cookie kept by the test client
    for _ in range(7):
        guess(client)
    assert guess(client) == 429
    assert client.get("/api/clients").status_code == 200
    assert client.get("/clients").status_code == 200
    before = len(audit_addresses(client))
    client.get("/api/clients")
    assert len(audit_addresses(client)) == before  # nothing counted
