"""The clients pages and /api/clients: limits, keys, spend bars, detail; admin login throttling."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from core.limits import spend_name
from storage import client_keys, counters, db
from tests.monitor_ui.conftest import csrf_of

ADMIN = "kra-test-admin-key-0123456789abcdef"
AUTH = {"authorization": f"Bearer {ADMIN}"}


@pytest.fixture
def client(open_ui, ui_db_path: Path) -> TestClient:
    test_client = open_ui(ADMIN)
    test_client.db_path = ui_db_path
    return test_client


def test_api_creates_a_client_with_limits_and_changes_them(client):
    created = client.post(
        "/api/clients", json={"name": "team", "limits": {"rpm": 60, "models": ["gpt-4o*"]}}, headers=AUTH
    )
    assert created.status_code == 201 and created.json()["key"].startswith("kr-")
    listed = client.get("/api/clients", headers=AUTH).json()["clients"]
    assert listed[0]["limits"] == {"models": "gpt-4o*", "rpm": 60}
    changed = client.patch(
        "/api/clients/1", json={"rpm": None, "daily_usd": "2.5", "expires": "2030-01-01"}, headers=AUTH
    )
    assert changed.status_code == 200
    assert changed.json()["limits"] == {"models": "gpt-4o*", "daily_usd": 2.5, "expires": "2030-01-01T00:00:00Z"}
    bad = client.patch("/api/clients/1", json={"rpm": "lots"}, headers=AUTH)
    assert bad.status_code == 422 and "rpm must be a whole number" in bad.json()["error"]["message"]
    assert client.patch("/api/clients/1", json={"speed": 1}, headers=AUTH).status_code == 422
    assert client.patch("/api/clients/9", json={"rpm": 1}, headers=AUTH).status_code == 404
    key = client.post("/api/clients/1/keys", headers=AUTH).json()
    assert client.post(f"/api/clients/1/keys/{key['id']}/revoke", headers=AUTH).json() == {
        "id": key["id"],
        "done": "revoke",
    }
    assert client.post(f"/api/clients/1/keys/{key['id']}/revoke", headers=AUTH).status_code == 404
    detail = client.get("/api/clients/1", headers=AUTH).json()
    assert [k["state"] for k in detail["keys"]] == ["active", "revoked"]
    assert client.post("/api/clients", json={"name": "x", "limits": {"ips": "nope"}}, headers=AUTH).status_code == 422


def test_detail_page_shows_keys_limits_and_spend_against_budget(client):
    conn = db.connect(client.db_path)
    client_keys.create_client(conn, "team")
    client_keys.set_limits(conn, "team", {"daily_tokens": "1000"})
    conn.execute(
        "INSERT INTO limit_counters (name, value, updated_at) VALUES (?, 250, ?)",
        (spend_name(1, "tokens", "day", time.time()), time.time()),
    )
    conn.commit()
    assert counters.clients_spend(conn, [1], time.time())[1]["day_tokens"] == 250
    conn.close()
    assert client.post("/login", data={"admin_key": ADMIN}).status_code == 303
    page = client.get("/clients/1").text
    assert '<meter min="0" max="1000" value="250.0"' in page and "25%" in page
    assert 'name="daily_tokens" value="1000"' in page
    csrf = csrf_of(page)
    added = client.post("/clients/1/keys", data={"csrf": csrf}).text
    key = re.search(r'<pre id="new-client-key">([^<]+)</pre>', added).group(1)
    assert key not in client.get("/clients/1").text  # shown once
    response = client.post("/clients/1/limits", data={"csrf": csrf, "daily_tokens": "", "rpm": "0"})
    assert response.status_code == 422 and "rpm must be a whole number from 1" in response.text
    assert client.post("/clients/1/limits", data={"csrf": csrf, "daily_tokens": "", "rpm": "5"}).status_code == 303
    assert client.get("/api/clients/1", headers=AUTH).json()["limits"] == {"rpm": 5}
    page = client.post("/clients", data={"csrf": csrf, "name": "<b>x</b>"})
    assert page.status_code == 422
    page = client.post("/clients", data={"csrf": csrf, "name": "ops", "tpm": "5000", "models": ""})
    assert "ops" in page.text and "tpm=5000" in page.text


def test_failed_logins_are_slowed_then_refused_with_retry_after(client):
    statuses = [client.post("/login", data={"admin_key": f"guess-{i}"}).status_code for i in range(6)]
    assert statuses == [401] * 6
    refused = client.post("/login", data={"admin_key": "guess-6"})  # locked: wrong keys are refused
    assert refused.status_code == 429
    assert 1 <= int(refused.headers["retry-after"]) <= 900
    # The right key is never refused: guesses from an address cannot lock the admin out behind it.
    assert client.post("/login", data={"admin_key": ADMIN}).status_code == 303
    conn = db.connect(client.db_path)
    actions = [r[0] for r in conn.execute("SELECT action FROM audit_log ORDER BY id")]
    conn.close()
    assert actions == ["login.failed"] * 6 + ["login.refused", "login.succeeded"]


def test_flows_filter_by_client_covers_all_its_keys(client):
    from core.records import FlowRecord
    from storage import flows

    conn = db.connect(client.db_path)
    client_keys.create_client(conn, "team")
    second_key, _ = client_keys.add_key(conn, "team")
    records = [
        FlowRecord(
            flow_id=f"f{i}",
            started_at=time.time(),
            method="POST",
            path="/v1/chat/completions",
            client_key_id=key_id,
            client_id=1,
            refusal=refusal,
        )
        for i, (key_id, refusal) in enumerate([(1, None), (second_key, "rate_limit_exceeded"), (None, None)])
    ]
    with conn:
        flows.insert_batch(conn, records)
    conn.close()
    listed = client.get("/api/flows", params={"client_id": 1}, headers=AUTH).json()["flows"]
    assert sorted(f["client_key_id"] or 0 for f in listed) == [0, 1, second_key]
    refused = client.get("/api/flows", params={"refusal": "rate_limit_exceeded"}, headers=AUTH).json()["flows"]
    assert [f["client_key_id"] for f in refused] == [second_key]
    assert client.get("/api/flows", params={"client_id": "x"}, headers=AUTH).status_code == 422


def test_the_audit_page_and_its_json_twin_filter_alike_and_refuse_bad_filters_alike(client):
    client.post("/api/clients", json={"name": "team"}, headers=AUTH)
    client.patch("/api/clients/1", json={"rpm": 5}, headers=AUTH)
    entries = client.get("/api/audit", params={"action": "clients.set"}, headers=AUTH).json()["entries"]
    assert [e["action"] for e in entries] == ["clients.set"] and entries[0]["actor"] == "admin-api"
    assert client.post("/login", data={"admin_key": ADMIN}).status_code == 303
    page = client.get("/audit", params={"action": "clients.set"}).text
    assert page.count("clients.set") >= 2 and "clients.add" not in page  # the form's value and the one entry
    assert 'href="/api/audit?action=clients.set"' in page
    for bad in ({"actor": "robot"}, {"since": "yesterday"}, {"target": "x" * 201}):
        assert client.get("/audit", params=bad).status_code == 422, bad
        assert client.get("/api/audit", params=bad, headers=AUTH).status_code == 422, bad


def test_each_object_shows_its_client_in_the_flow_and_on_the_clients_page(client):
    from core.affinity import OwnedObject, Ownership
    from core.records import FlowRecord
    from storage import flows, objects

    conn = db.connect(client.db_path)
    client_keys.create_client(conn, "team")
    client_keys.set_legacy_objects(conn, "team", True)
    made = Ownership(
        "f1",
        1,
        (OwnedObject("file-made", "file"),),
        ("file-old",),
        (OwnedObject("file-old", "file"),),
        client_id=1,
        claimed=frozenset({"file-made"}),
    )
    with conn:
        flows.insert_batch(
            conn, [FlowRecord(flow_id="f1", started_at=time.time(), method="POST", path="/v1/files", client_id=1)]
        )
        objects.record_in_transaction(conn, [made])
    conn.close()
    flow = client.get("/api/flows", headers=AUTH).json()["flows"][0]
    detail = client.get(f"/api/flows/{flow['id']}", headers=AUTH).json()
    assert {o["id"]: (o["client_id"], o["client_name"]) for o in detail["objects"]} == {
        "file-made": (1, "team"),
        "file-old": (None, None),
    }
    assert client.patch("/api/clients/1", json={"legacy_objects": "yes"}, headers=AUTH).status_code == 422
    assert (
        client.patch("/api/clients/1", json={"legacy_objects": False}, headers=AUTH).json()["legacy_objects"] is False
    )
    team = client.patch("/api/clients/1", json={"legacy_objects": True, "rpm": 5}, headers=AUTH).json()
    assert team["legacy_objects"] is True and team["limits"] == {"rpm": 5}
    assert [(o["id"], o["kind"], o["owner_key_id"], o["flow_id"]) for o in team["objects"]] == [
        ("file-made", "file", 1, "f1")
    ]
    assert client.post("/login", data={"admin_key": ADMIN}).status_code == 303
    assert "file-made" in client.get("/clients/1").text
    page = client.get(f"/flows/{flow['id']}").text
    assert '<a href="/clients/1">team</a>' in page
