"""The upstream keys' JSON API: listing without values, weights, re-validation against a real fake upstream."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from storage import db, secrets, upstream_keys
from storage.upstream_keys import SqliteKeyStore
from tests.fake_upstream import FakeUpstream
from tests.monitor_ui.conftest import csrf_of
from usecases.keys import add_keys

ADMIN = "kra-keys-api-admin-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
GOOD = "sk-good-api-aaaaaaaaaaaaaaaaaaaaaaaaa0001"
REVIVED = "sk-good-api-bbbbbbbbbbbbbbbbbbbbbbbbb0002"
REVOKED = "sk-revoked-api-ccccccccccccccccccccc0003"
QUOTA = "sk-good-api-quotaxxxxxxxxxxxxxxxxxxx0004"


@pytest.fixture
def app_setup(
    open_ui, ui_db_path: Path, upstream: FakeUpstream
) -> Iterator[tuple[TestClient, sqlite3.Connection, Path]]:
    def seed(conn, path: Path) -> None:
        add_keys(SqliteKeyStore(conn, secrets.key_cipher(path)), [GOOD, REVIVED, REVOKED, QUOTA])
        # As the proxy would have left them: REVIVED was revoked once and has since been restored upstream.
        for key_id, state in ((2, "invalid"), (3, "invalid"), (4, "exhausted")):
            upstream_keys.record_state(conn, key_id, state, "seen before", None, 0)
        conn.commit()

    upstream.set_key(QUOTA, "quota")
    client = open_ui(ADMIN, {"proxy.upstream": upstream.url}, seed)
    conn = db.connect(ui_db_path)
    yield client, conn, ui_db_path
    conn.close()


def states(conn) -> dict[int, str]:
    return {r["id"]: r["state"] for r in upstream_keys.list_keys(conn)}


def test_listing_needs_the_admin_and_never_shows_a_key(app_setup):
    client, _, _ = app_setup
    assert client.get("/api/keys").status_code == 401
    response = client.get("/api/keys", headers=AUTH)
    assert response.status_code == 200
    assert [k["key"] for k in response.json()["keys"]] == ["…0001", "…0002", "…0003", "…0004"]
    for value in (GOOD, REVIVED, REVOKED, QUOTA):
        assert value not in response.text


def test_weight_is_stored_and_announced_to_the_proxy(app_setup):
    client, conn, _ = app_setup
    before = db.read_revision(conn, "keys")
    response = client.post("/api/keys/1/weight", json={"weight": 2.5}, headers=AUTH)
    assert response.status_code == 200 and response.json() == {"id": 1, "weight": 2.5}
    assert upstream_keys.list_keys(conn)[0]["weight"] == 2.5
    assert db.read_revision(conn, "keys") == before + 1


@pytest.mark.parametrize(
    "body, status",
    [({"weight": 0}, 422), ({"weight": -1}, 422), ({"weight": "x"}, 422), ({}, 422), ({"weight": 1001}, 422)],
)
def test_bad_weights_are_refused_openai_style_and_change_nothing(app_setup, body, status):
    client, conn, _ = app_setup
    response = client.post("/api/keys/1/weight", json=body, headers=AUTH)
    assert response.status_code == status
    assert set(response.json()["error"]) >= {"message", "type", "code"}
    assert upstream_keys.list_keys(conn)[0]["weight"] == 1.0


def test_unknown_key_is_404(app_setup):
    client, _, _ = app_setup
    response = client.post("/api/keys/99/weight", json={"weight": 2}, headers=AUTH)
    assert response.status_code == 404 and "99" in response.json()["error"]["message"]


def test_a_session_needs_its_csrf_token_to_change_anything(app_setup):
    client, conn, _ = app_setup
    assert client.post("/login", data={"admin_key": ADMIN}).status_code == 303
    assert client.post("/api/keys/1/weight", json={"weight": 3}).status_code == 403
    assert client.post("/api/keys/1/weight", json={"weight": 3}, headers={"x-csrf-token": "forged"}).status_code == 403
    token = csrf_of(client.get("/flows").text)
    assert client.post("/api/keys/1/weight", json={"weight": 3}, headers={"x-csrf-token": token}).status_code == 200
    assert upstream_keys.list_keys(conn)[0]["weight"] == 3


def test_validate_probes_invalid_and_exhausted_keys_by_default(app_setup, upstream: FakeUpstream):
    client, conn, _ = app_setup
    response = client.post("/api/keys/validate", json={}, headers=AUTH)
    assert response.status_code == 200
    results = {r["id"]: (r["result"], r["state"]) for r in response.json()["results"]}
    assert results == {2: ("ok", "active"), 3: ("invalid", "invalid"), 4: ("exhausted", "exhausted")}
    assert states(conn) == {1: "active", 2: "active", 3: "invalid", 4: "exhausted"}
    probes = [r for r in upstream.received if r.path == "/v1/models"]
    assert sorted(r.key for r in probes) == sorted([REVIVED, REVOKED, QUOTA])  # the good key was not probed
    assert GOOD not in response.text and REVIVED not in response.text


def test_validate_one_key_by_id(app_setup, upstream: FakeUpstream):
    client, conn, _ = app_setup
    response = client.post("/api/keys/validate", json={"ids": [2]}, headers=AUTH)
    assert [(r["id"], r["state"]) for r in response.json()["results"]] == [(2, "active")]
    assert [r.key for r in upstream.received] == [REVIVED]
