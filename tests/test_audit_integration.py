"""The audit log end to end: a CLI change, a UI session's change and an admin API call, each with its actor."""

from __future__ import annotations

import re

import httpx

from tests.conftest import ADMIN_KEY, Keyrotor

GOOD = "sk-good-aaaaaaaaaaaaaaaaaaaaaaaaaaaa0001"


def test_audit_log_records_cli_and_ui_changes_with_their_actors(keyrotor: Keyrotor):
    keyrotor.add_keys(GOOD)
    keyrotor.cli("clients", "add", "team", "--rpm", "60")
    keyrotor.cli("keys", "disable", "1")
    keyrotor.start_ui()
    browser = httpx.Client(base_url=keyrotor.ui_url, follow_redirects=False)
    assert browser.post("/login", data={"admin_key": "wrong"}).status_code == 401
    assert browser.post("/login", data={"admin_key": ADMIN_KEY}).status_code == 303
    page = browser.get("/clients/1").text
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    response = browser.post("/clients/1/limits", data={"csrf": csrf, "rpm": "30", "models": "gpt-4o*"})
    assert response.status_code == 303
    api = httpx.Client(base_url=keyrotor.ui_url, headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert api.post("/api/keys/1/enable").status_code == 200

    entries = api.get("/api/audit").json()["entries"]
    assert all(set(e) == {"at", "actor", "address", "action", "target", "changes"} for e in entries)
    assert [e["at"] for e in entries] == sorted((e["at"] for e in entries), reverse=True)  # newest first
    acts = [(e["actor"], e["action"]) for e in reversed(entries)]
    assert acts == [
        ("cli", "keys.add"),
        ("cli", "clients.add"),
        ("cli", "keys.disable"),
        ("ui-session", "login.failed"),
        ("ui-session", "login.succeeded"),
        ("ui-session", "clients.set"),
        ("admin-api", "keys.enable"),
    ]
    by_action = {e["action"]: e for e in entries}
    assert by_action["clients.set"]["target"] == "team"
    assert by_action["clients.set"]["changes"]["rpm"] == {"from": 60, "to": 30}
    assert by_action["clients.set"]["address"] == "127.0.0.1"
    assert by_action["keys.disable"]["address"] is None and by_action["keys.disable"]["target"] == "1"
    text = str(entries)
    assert GOOD not in text and ADMIN_KEY not in text and "wrong" not in text  # never a secret
    assert [
        e["action"] for e in api.get("/api/audit", params={"actor": "cli", "action": "keys"}).json()["entries"]
    ] == [
        "keys.disable",
        "keys.add",
    ]
    page = browser.get("/audit", params={"actor": "ui-session"}).text
    assert "clients.set" in page and "keys.add" not in page
    assert 'href="/audit" aria-current="page"' in page  # in the nav, as every admin page
