"""Many upstreams in the monitor UI: the upstreams, group and models pages with their JSON twins, keys by
group, flows by upstream and group, the dashboard's and /metrics' breakdowns — and who may use them."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from core.records import AttemptLog
from core.routing import Dialect
from storage import db, routes, secrets
from storage.upstream_keys import SqliteKeyStore
from tests.fake_upstream import MODELS
from tests.monitor_ui.conftest import assert_sent_to_login, assert_served, flow_ids, log_in, stored_flow, write_flows
from usecases.keys import add_keys

ADMIN = "kra-upstream-pages-admin-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
NOW = time.time()
DEFAULT_KEY = "sk-good-routes-aaaaaaaaaaaaaaaaaaaa0001"
CHEAP_KEYS = ["sk-good-routes-bbbbbbbbbbbbbbbbbbbb0002", "sk-good-routes-cccccccccccccccccccc0003"]
AZURE_KEY = "sk-good-routes-dddddddddddddddddddd0004"
NEW_KEY = "sk-good-routes-eeeeeeeeeeeeeeeeeeee0005"
EVIL = "<script>alert(1)</script>"
EVIL_NAME = "<img src=x onerror=alert(1)>"  # no slash: it must survive as an UPSTREAM/GROUP label

# Ids as the seed below makes them: the migration's default upstream and group are 1.
DEFAULT, RELAY, AZURE = 1, 2, 3  # upstreams
DEFAULT_GROUP, CHEAP, PREMIUM, PROD = 1, 2, 3, 4  # groups


def row(n: int, **overrides) -> dict:
    routed = {"client_key_id": None, "upstream_id": DEFAULT, "group_id": DEFAULT_GROUP}
    return stored_flow(n, NOW, **(routed | overrides))


ROWS = [
    row(1),
    row(2, upstream_key_id=2, upstream_id=RELAY, group_id=CHEAP),
    row(
        3,
        upstream_key_id=2,
        upstream_id=RELAY,
        group_id=CHEAP,
        attempts=2,
        attempt_log=[
            AttemptLog(1, key_id=4, started_at=NOW - 97, status=500, upstream_id=AZURE, group_id=PROD),
            AttemptLog(2, key_id=2, started_at=NOW - 96.9, status=200, upstream_id=RELAY, group_id=CHEAP),
        ],
    ),
    row(
        4,
        model="o1",
        fallback_model="gpt-4o-mini",
        upstream_key_id=3,
        upstream_id=RELAY,
        group_id=CHEAP,
        attempts=2,
        attempt_log=[
            AttemptLog(1, key_id=1, started_at=NOW - 96, status=404, upstream_id=DEFAULT, group_id=DEFAULT_GROUP),
            AttemptLog(
                2, key_id=3, started_at=NOW - 95.9, status=200, upstream_id=RELAY, group_id=CHEAP, model="gpt-4o-mini"
            ),
        ],
    ),
    row(5, model="gpt-4o", upstream_key_id=4, upstream_id=AZURE, group_id=PROD, status=500, cost=None),
    row(6, status=401, model=None, upstream_key_id=None, upstream_id=None, group_id=None, attempts=0),
]


@pytest.fixture
def setup(open_ui, ui_db_path: Path, upstream) -> tuple[TestClient, Path]:
    def seed(conn, path: Path) -> None:
        # The relay is the fake upstream itself, so refreshing its models asks a real server.
        assert routes.add_upstream(conn, "relay", upstream.url, Dialect.OPENAI, None) == RELAY
        assert routes.add_group(conn, "relay/cheap", priority=10) == CHEAP
        assert routes.add_group(conn, "relay/premium", priority=5, weight=2) == PREMIUM
        assert routes.add_upstream(conn, "azure", "http://127.0.0.1:9", Dialect.AZURE, "2024-10-21") == AZURE
        assert routes.add_group(conn, "azure/prod") == PROD
        routes.add_model(conn, PROD, "gpt-4o", "prod-gpt4o")
        routes.add_model(conn, CHEAP, "gpt-4o-mini", None)
        routes.set_fallbacks(conn, "o1", ["gpt-4o-mini"])
        store = SqliteKeyStore(conn, secrets.key_cipher(path))
        add_keys(store, [DEFAULT_KEY])
        add_keys(store, CHEAP_KEYS, group_id=CHEAP)
        add_keys(store, [AZURE_KEY], group_id=PROD)
        write_flows(conn, ROWS)

    return open_ui(ADMIN, {"proxy.upstream": upstream.url}, seed), ui_db_path


@pytest.fixture
def client(setup) -> TestClient:
    return setup[0]


def logged_in(client: TestClient) -> str:
    """Log in; returns the CSRF token of the session's pages."""
    return log_in(client, ADMIN, page="/upstreams")


def is_openai_error(response, status: int) -> bool:
    body = response.json()
    return (
        response.status_code == status
        and set(body) == {"error"}
        and body["error"]["code"] == str(status)
        and bool(body["error"]["message"])
    )


def everything(client: TestClient) -> tuple:
    """What every change here could touch, as the JSON API shows it."""
    return tuple(
        client.get(url, headers=AUTH).json()
        for url in ("/api/upstreams", "/api/groups", "/api/models", "/api/keys", f"/api/groups/{CHEAP}")
    )


def routes_revision(path: Path) -> int:
    conn = db.connect(path, readonly=True)
    try:
        return db.read_revision(conn, routes.ROUTES)
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------------------------
# Who may use them


PAGES = ["/upstreams", f"/groups/{CHEAP}", "/models", f"/keys?group={CHEAP}"]
APIS = ["/api/upstreams", "/api/upstreams/relay", "/api/groups", f"/api/groups/{CHEAP}", "/api/models"]
API_CHANGES = [
    ("POST", "/api/upstreams", {"name": "openai", "base_url": "https://api.openai.com"}),
    ("PUT", "/api/upstreams/relay", {"base_url": "https://elsewhere.example"}),
    ("DELETE", "/api/upstreams/relay", None),
    ("POST", "/api/upstreams/relay/disable", None),
    ("POST", "/api/groups", {"upstream": "relay", "name": "extra"}),
    ("PUT", f"/api/groups/{CHEAP}", {"priority": 99}),
    ("DELETE", f"/api/groups/{CHEAP}", None),
    ("POST", f"/api/groups/{CHEAP}/disable", None),
    ("POST", f"/api/groups/{CHEAP}/models", {"model": "gpt-9"}),
    ("DELETE", f"/api/groups/{CHEAP}/models/gpt-4o-mini", None),
    ("POST", f"/api/groups/{CHEAP}/models/refresh", None),
    ("PUT", "/api/models/o1/fallbacks", {"fallbacks": []}),
    ("POST", "/api/keys", {"keys": [NEW_KEY], "group": "relay/cheap"}),
]
FORMS = [
    ("/upstreams", {"name": "openai", "base_url": "https://api.openai.com"}),
    ("/upstreams/relay/edit", {"base_url": "https://elsewhere.example", "dialect": "openai"}),
    ("/upstreams/relay/disable", {}),
    ("/upstreams/relay/delete", {}),
    ("/groups", {"upstream": "relay", "name": "extra"}),
    (f"/groups/{CHEAP}/edit", {"priority": "99", "weight": "3"}),
    (f"/groups/{CHEAP}/disable", {}),
    (f"/groups/{CHEAP}/delete", {}),
    (f"/groups/{CHEAP}/models/add", {"model": "gpt-9"}),
    (f"/groups/{CHEAP}/models/delete", {"model": "gpt-4o-mini"}),
    (f"/groups/{CHEAP}/models/refresh", {}),
    (f"/groups/{CHEAP}/keys/validate", {}),
    (f"/groups/{CHEAP}/keys/reset-invalid", {}),
    ("/models/fallbacks", {"model": "o1", "fallbacks": ""}),
    ("/keys/add", {"keys": NEW_KEY, "group_id": str(CHEAP), "back": "group"}),
    ("/keys/2/disable", {"back": "group"}),
]


@pytest.mark.parametrize("url", PAGES)
def test_pages_send_strangers_to_login(client, url):
    assert_sent_to_login(client.get(url))


@pytest.mark.parametrize("url", APIS)
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer kra-wrong"}], ids=["none", "wrong"])
def test_apis_refuse_strangers(client, url, headers):
    response = client.get(url, headers=headers)
    assert is_openai_error(response, 401)
    assert "relay" not in response.text


@pytest.mark.parametrize("method, url, body", API_CHANGES)
def test_api_changes_refuse_strangers_and_sessions_without_the_csrf_header(setup, method, url, body):
    client, path = setup
    before, revision = everything(client), routes_revision(path)
    assert is_openai_error(client.request(method, url, json=body, headers={"Authorization": "Bearer x"}), 401)
    logged_in(client)
    assert is_openai_error(client.request(method, url, json=body), 403)
    assert everything(client) == before and routes_revision(path) == revision


@pytest.mark.parametrize("url, form", FORMS)
def test_forms_without_the_csrf_token_change_nothing(setup, url, form):
    client, path = setup
    before, revision = everything(client), routes_revision(path)
    stranger = client.post(url, data={**form, "csrf": "x"})
    assert stranger.status_code == 303 and stranger.headers["location"].startswith("/login")
    logged_in(client)
    for csrf in ({}, {"csrf": ""}, {"csrf": "0" * 64}):
        assert is_openai_error(client.post(url, data={**form, **csrf}), 403)
    assert everything(client) == before and routes_revision(path) == revision


@pytest.mark.parametrize("url", PAGES + APIS)
def test_every_page_and_twin_works_for_the_admin(client, url):
    logged_in(client)
    assert_served(client.get(url))


def test_the_navigation_links_the_new_pages(client):
    logged_in(client)
    page = client.get("/upstreams").text
    assert '<a href="/upstreams" aria-current="page">Upstreams</a>' in page
    assert '<a href="/models">Models</a>' in page
    assert '<a href="/models" aria-current="page">Models</a>' in client.get("/models").text
    assert client.get("/groups").headers["location"] == "/upstreams"


# ---------------------------------------------------------------------------------------------------------------
# Upstreams


def test_upstream_api_lists_adds_edits_disables_and_deletes(setup):
    client, path = setup
    listed = {u["name"]: u for u in client.get("/api/upstreams", headers=AUTH).json()["upstreams"]}
    assert list(listed) == ["default", "relay", "azure"]
    assert listed["default"]["base_url"] is None  # the proxy's own upstream
    assert (listed["relay"]["groups"], listed["relay"]["keys"]) == (2, 2)
    assert [g["label"] for g in listed["relay"]["group_list"]] == ["relay/cheap", "relay/premium"]
    assert (listed["azure"]["dialect"], listed["azure"]["api_version"]) == ("azure", "2024-10-21")

    revision = routes_revision(path)
    created = client.post(
        "/api/upstreams", json={"name": "openai", "base_url": "https://api.openai.com/v1/"}, headers=AUTH
    )
    assert created.status_code == 201
    assert created.json() | {"id": 0, "created_at": 0} == {
        "id": 0,
        "name": "openai",
        "base_url": "https://api.openai.com/v1",
        "dialect": "openai",
        "api_version": None,
        "enabled": True,
        "groups": 0,
        "keys": 0,
        "created_at": 0,
        "group_list": [],
    }
    assert routes_revision(path) > revision  # running proxies reload their routes

    changed = client.put("/api/upstreams/openai", json={"dialect": "azure", "api_version": "2025-01-01"}, headers=AUTH)
    assert (changed.json()["dialect"], changed.json()["api_version"], changed.json()["base_url"]) == (
        "azure",
        "2025-01-01",
        "https://api.openai.com/v1",  # left out: unchanged
    )
    cleared = client.put("/api/upstreams/openai", json={"api_version": None, "base_url": None}, headers=AUTH).json()
    assert (cleared["api_version"], cleared["base_url"]) == (None, None)

    assert client.post("/api/upstreams/relay/disable", headers=AUTH).json()["enabled"] is False
    assert client.post("/api/upstreams/relay/enable", headers=AUTH).json()["enabled"] is True

    gone = client.delete("/api/upstreams/relay", headers=AUTH)
    assert gone.json() == {"name": "relay", "deleted": True, "groups": 2, "keys": 2}
    assert [g["label"] for g in client.get("/api/groups", headers=AUTH).json()["groups"]] == [
        "default/default",
        "azure/prod",
    ]
    assert [k["key"] for k in client.get("/api/keys", headers=AUTH).json()["keys"]] == ["…0001", "…0004"]


def test_upstreams_page_adds_edits_and_deletes_with_a_confirmation_that_counts(client):
    csrf = logged_in(client)
    page = client.get("/upstreams").text
    assert "Delete upstream relay with its 2 group(s) and 2 key(s)? This cannot be undone." in page
    assert '<a href="/groups/2">relay/<wbr>cheap</a>' in page and '<a href="/keys?group=2">2</a>' in page
    assert "the proxy's own upstream" in page  # default's base URL is proxy.upstream

    added = client.post(
        "/upstreams", data={"csrf": csrf, "name": "openai", "base_url": "https://api.openai.com", "dialect": "openai"}
    )
    assert added.status_code == 303 and added.headers["location"].startswith("/upstreams?done=added#upstream-")
    page = client.get(added.headers["location"]).text
    assert "Upstream added" in page and "<code>https://api.openai.com</code>" in page

    refused = client.post("/upstreams", data={"csrf": csrf, "name": "relay", "base_url": "https://x.example"})
    assert refused.status_code == 409 and "already exists" in refused.text and 'role="alert"' in refused.text
    refused = client.post("/upstreams", data={"csrf": csrf, "name": "x y", "base_url": "https://x.example"})
    assert refused.status_code == 422 and "letters, digits" in refused.text

    edited = client.post(
        "/upstreams/openai/edit",
        data={"csrf": csrf, "base_url": "https://relay2.example/v1", "dialect": "azure", "api_version": ""},
    )
    assert edited.status_code == 303
    changed = client.get("/api/upstreams/openai", headers=AUTH).json()
    assert (changed["base_url"], changed["dialect"], changed["api_version"]) == (
        "https://relay2.example/v1",
        "azure",
        None,
    )
    assert client.post("/upstreams/openai/edit", data={"csrf": csrf, "base_url": "nope"}).status_code == 422

    assert client.post("/upstreams/azure/disable", data={"csrf": csrf}).status_code == 303
    assert client.get("/api/upstreams/azure", headers=AUTH).json()["enabled"] is False
    page = client.get("/upstreams").text
    assert "upstream disabled" in page  # azure/prod serves nothing while its upstream is off

    deleted = client.post("/upstreams/relay/delete", data={"csrf": csrf})
    assert deleted.headers["location"] == "/upstreams?done=deleted&groups=2&keys=2"
    assert "Upstream deleted, with 2 group(s) and 2 key(s)." in client.get(deleted.headers["location"]).text
    assert client.post("/upstreams/relay/delete", data={"csrf": csrf}).status_code == 404


# ---------------------------------------------------------------------------------------------------------------
# Groups


def test_group_api_creates_edits_disables_and_deletes(setup):
    client, path = setup
    listed = client.get("/api/groups", headers=AUTH).json()["groups"]
    assert [g["label"] for g in listed] == ["relay/cheap", "relay/premium", "default/default", "azure/prod"]
    cheap = client.get(f"/api/groups/{CHEAP}", headers=AUTH).json()
    assert (cheap["priority"], cheap["weight"], cheap["keys"], cheap["every_model"]) == (10, 1.0, 2, False)
    assert [k["key"] for k in cheap["key_list"]] == ["…0002", "…0003"]
    assert cheap["model_list"] == [{"model": "gpt-4o-mini", "upstream_model": None, "source": "manual"}]
    assert cheap["by_state"]["active"] == 2
    for value in CHEAP_KEYS:
        assert value not in json.dumps(cheap)

    created = client.post("/api/groups", json={"upstream": "relay", "name": "bulk", "weight": 0.5}, headers=AUTH)
    assert created.status_code == 201
    bulk = created.json()
    assert (bulk["label"], bulk["priority"], bulk["weight"], bulk["every_model"], bulk["keys"]) == (
        "relay/bulk",
        0,
        0.5,
        True,
        0,
    )
    revision = routes_revision(path)
    assert client.put(f"/api/groups/{bulk['id']}", json={"priority": 20}, headers=AUTH).json()["weight"] == 0.5
    assert client.get("/api/groups", headers=AUTH).json()["groups"][0]["label"] == "relay/bulk"  # now tried first
    assert routes_revision(path) > revision
    assert client.post(f"/api/groups/{bulk['id']}/disable", headers=AUTH).json()["serving"] is False
    assert client.post(f"/api/groups/{bulk['id']}/enable", headers=AUTH).json()["serving"] is True
    assert client.delete(f"/api/groups/{CHEAP}", headers=AUTH).json() == {
        "id": CHEAP,
        "label": "relay/cheap",
        "deleted": True,
        "keys": 2,
    }
    assert client.get(f"/api/groups/{CHEAP}", headers=AUTH).status_code == 404


@pytest.mark.parametrize(
    "method, url, body, status",
    [
        ("POST", "/api/upstreams", {"name": "relay", "base_url": "https://x.example"}, 409),
        ("POST", "/api/upstreams", {"name": EVIL_NAME, "base_url": "https://x.example"}, 422),
        ("POST", "/api/upstreams", {"name": "a/b", "base_url": "https://x.example"}, 422),
        ("POST", "/api/upstreams", {"name": "", "base_url": "https://x.example"}, 422),
        ("POST", "/api/upstreams", {"name": "new", "base_url": "ftp://x.example"}, 422),
        ("POST", "/api/upstreams", {"name": "new", "base_url": "not a url"}, 422),
        ("POST", "/api/upstreams", {"name": "new"}, 422),
        ("POST", "/api/upstreams", {"name": "new", "base_url": "https://x.example", "dialect": "bedrock"}, 422),
        ("POST", "/api/upstreams", {"name": "new", "base_url": "https://x.example", "api_version": "1 2"}, 422),
        ("PUT", "/api/upstreams/relay", {"dialect": None}, 422),
        ("PUT", "/api/upstreams/relay", {"base_url": "relay.example"}, 422),
        ("PUT", "/api/upstreams/nope", {"dialect": "azure"}, 404),
        ("DELETE", "/api/upstreams/nope", None, 404),
        ("POST", "/api/upstreams/nope/disable", None, 404),
        ("POST", "/api/upstreams/relay/explode", None, 404),
        ("GET", "/api/upstreams/nope", None, 404),
        ("POST", "/api/groups", {"upstream": "relay", "name": "cheap"}, 409),
        ("POST", "/api/groups", {"upstream": "nope", "name": "x"}, 404),
        ("POST", "/api/groups", {"upstream": "relay", "name": "a/b"}, 422),
        ("POST", "/api/groups", {"upstream": "relay", "name": EVIL_NAME}, 422),
        ("POST", "/api/groups", {"upstream": "relay", "name": "x", "weight": 0}, 422),
        ("POST", "/api/groups", {"upstream": "relay", "name": "x", "weight": 1001}, 422),
        ("POST", "/api/groups", {"upstream": "relay", "name": "x", "priority": "high"}, 422),
        ("PUT", f"/api/groups/{CHEAP}", {"weight": -1}, 422),
        ("PUT", "/api/groups/99", {"weight": 2}, 404),
        ("DELETE", "/api/groups/99", None, 404),
        ("POST", "/api/groups/99/enable", None, 404),
        ("POST", f"/api/groups/{CHEAP}/explode", None, 404),
        ("GET", "/api/groups/99", None, 404),
        ("POST", f"/api/groups/{CHEAP}/models", {"model": "has space"}, 422),
        ("POST", f"/api/groups/{CHEAP}/models", {"model": ""}, 422),
        ("POST", f"/api/groups/{CHEAP}/models", {"model": "gpt-4o", "upstream_model": "a b"}, 422),
        ("POST", "/api/groups/99/models", {"model": "gpt-4o"}, 404),
        ("DELETE", f"/api/groups/{CHEAP}/models/gpt-4o", None, 404),
        ("DELETE", "/api/groups/99/models/gpt-4o", None, 404),
        ("POST", f"/api/groups/{PREMIUM}/models/refresh", None, 409),  # no keys to ask with
        ("POST", "/api/groups/99/models/refresh", None, 404),
    ],
)
def test_upstream_and_group_apis_refuse_bad_input_clearly_and_change_nothing(setup, method, url, body, status):
    client, path = setup
    before, revision = everything(client), routes_revision(path)
    response = client.request(method, url, json=body, headers=AUTH)
    assert is_openai_error(response, status), response.text
    assert everything(client) == before and routes_revision(path) == revision


def test_group_models_are_added_renamed_upstream_and_deleted(client):
    added = client.post(f"/api/groups/{CHEAP}/models", json={"model": "openai/gpt-4o"}, headers=AUTH).json()
    assert {"model": "openai/gpt-4o", "upstream_model": None, "source": "manual"} in added["model_list"]
    renamed = client.post(
        f"/api/groups/{CHEAP}/models", json={"model": "gpt-4o-mini", "upstream_model": "gpt-4o-mini-2024"}, headers=AUTH
    ).json()
    assert {"model": "gpt-4o-mini", "upstream_model": "gpt-4o-mini-2024", "source": "manual"} in renamed["model_list"]
    # A model name with a slash (a relay's) is a path of its own in the URL.
    left = client.delete(f"/api/groups/{CHEAP}/models/openai/gpt-4o", headers=AUTH).json()
    assert [m["model"] for m in left["model_list"]] == ["gpt-4o-mini"]


def test_refresh_asks_the_upstream_with_a_group_key_and_keeps_manual_models(client, upstream):
    upstream.reset()
    result = client.post(f"/api/groups/{CHEAP}/models/refresh", headers=AUTH)
    assert result.status_code == 200, result.text
    listed = sorted(m["id"] for m in MODELS)
    assert result.json() == {
        "group": "relay/cheap",
        "added": len(listed) - 1,  # gpt-4o-mini was there already, by hand
        "removed": 0,
        "listed": len(listed),
        "error": None,
    }
    assert upstream.keys_seen()[-1] in CHEAP_KEYS
    models = client.get(f"/api/groups/{CHEAP}", headers=AUTH).json()["model_list"]
    assert sorted(m["model"] for m in models) == listed
    assert {m["model"]: m["source"] for m in models}["gpt-4o-mini"] == "manual"
    # An upstream that does not answer: 502, and the list stays as it was.
    down = client.post(f"/api/groups/{PROD}/models/refresh", headers=AUTH)
    assert (
        is_openai_error(down, 502)
        and "The models of azure/prod were not refreshed: " in down.json()["error"]["message"]
    )
    assert [m["model"] for m in client.get(f"/api/groups/{PROD}", headers=AUTH).json()["model_list"]] == ["gpt-4o"]


def test_group_page_shows_its_keys_models_and_edits_them(client, upstream):
    csrf = logged_in(client)
    page = client.get(f"/groups/{CHEAP}").text
    assert "<h1>relay/cheap" in page and "…0002" in page and "…0003" in page and "…0001" not in page
    assert "<code>gpt-4o-mini</code>" in page and 'value="gpt-4o-mini"' in page
    assert "Delete group relay/cheap with its 2 key(s) and 1 model(s)? This cannot be undone." in page
    assert '<a href="/flows?group=2">its flows</a>' in page
    for value in CHEAP_KEYS:
        assert value not in page

    saved = client.post(f"/groups/{CHEAP}/edit", data={"csrf": csrf, "priority": "7", "weight": "2.5"})
    assert saved.headers["location"] == f"/groups/{CHEAP}?done=group-edited"
    assert "Group saved." in client.get(saved.headers["location"]).text
    group = client.get(f"/api/groups/{CHEAP}", headers=AUTH).json()
    assert (group["priority"], group["weight"]) == (7, 2.5)
    refused = client.post(f"/groups/{CHEAP}/edit", data={"csrf": csrf, "priority": "7", "weight": "0"})
    assert refused.status_code == 422 and 'role="alert"' in refused.text and "Weight" in refused.text

    assert (
        client.post(
            f"/groups/{CHEAP}/models/add", data={"csrf": csrf, "model": "gpt-4o", "upstream_model": "gpt-4o-2024-11-20"}
        ).status_code
        == 303
    )
    page = client.get(f"/groups/{CHEAP}?done=model-saved").text
    assert "Model saved." in page and 'value="gpt-4o-2024-11-20"' in page
    assert client.post(f"/groups/{CHEAP}/models/add", data={"csrf": csrf, "model": "a b"}).status_code == 422
    assert client.post(f"/groups/{CHEAP}/models/delete", data={"csrf": csrf, "model": "gpt-4o"}).status_code == 303
    assert [m["model"] for m in client.get(f"/api/groups/{CHEAP}", headers=AUTH).json()["model_list"]] == [
        "gpt-4o-mini"
    ]

    refreshed = client.post(f"/groups/{CHEAP}/models/refresh", data={"csrf": csrf})
    assert refreshed.status_code == 200 and f"Upstream listed {len(MODELS)} model(s)" in refreshed.text
    no_keys = client.post(f"/groups/{PREMIUM}/models/refresh", data={"csrf": csrf})
    assert no_keys.status_code == 409 and "no usable key" in no_keys.text

    assert client.post(f"/groups/{CHEAP}/disable", data={"csrf": csrf}).status_code == 303
    assert "Group disabled" in client.get(f"/groups/{CHEAP}?done=group-disabled").text
    deleted = client.post(f"/groups/{CHEAP}/delete", data={"csrf": csrf})
    assert deleted.headers["location"] == "/upstreams?done=group-deleted&keys=2"
    assert client.get(f"/groups/{CHEAP}").status_code == 404


def test_key_actions_on_the_group_page_return_to_it(client):
    csrf = logged_in(client)
    text = "\n".join([NEW_KEY, CHEAP_KEYS[0], "not a key"])
    added = client.post("/keys/add", data={"csrf": csrf, "keys": text, "group_id": str(PREMIUM), "back": "group"})
    assert added.headers["location"].startswith(f"/groups/{PREMIUM}?done=added&count=1&duplicates=1")
    assert (
        "Added 1, skipped 1 duplicate(s), rejected 1 malformed (line 3)." in client.get(added.headers["location"]).text
    )
    premium = client.get(f"/api/groups/{PREMIUM}", headers=AUTH).json()
    assert [k["key"] for k in premium["key_list"]] == ["…0005"]

    disabled = client.post("/keys/2/disable", data={"csrf": csrf, "back": "group"})
    assert disabled.headers["location"] == f"/groups/{CHEAP}?done=disabled&count=1"
    assert "1 key(s) disabled." in client.get(disabled.headers["location"]).text
    renamed = client.post("/keys/3/edit", data={"csrf": csrf, "name": "Cheap 2", "back": "group"})
    assert renamed.headers["location"] == f"/groups/{CHEAP}?done=edited&count=1#key-3"
    assert client.post("/keys/3/delete", data={"csrf": csrf}).headers["location"] == "/keys?done=deleted&count=1"
    reset = client.post(f"/groups/{CHEAP}/keys/reset-invalid", data={"csrf": csrf})
    assert reset.headers["location"] == f"/groups/{CHEAP}?done=reset&count=0"
    validated = client.post(f"/groups/{CHEAP}/keys/validate", data={"csrf": csrf})
    assert validated.status_code == 200 and "no invalid or exhausted keys in this group" in validated.text


# ---------------------------------------------------------------------------------------------------------------
# Keys by group


def test_keys_carry_their_group_and_filter_by_it(client):
    listed = client.get("/api/keys", headers=AUTH).json()["keys"]
    assert [(k["key"], k["group_id"], k["group"]) for k in listed] == [
        ("…0001", DEFAULT_GROUP, "default/default"),
        ("…0002", CHEAP, "relay/cheap"),
        ("…0003", CHEAP, "relay/cheap"),
        ("…0004", PROD, "azure/prod"),
    ]
    for group in ("relay/cheap", str(CHEAP)):
        cheap = client.get("/api/keys", params={"group": group}, headers=AUTH).json()
        assert [k["id"] for k in cheap["keys"]] == [2, 3]
        assert cheap["by_state"]["active"] == 2 and cheap["by_state"]["disabled"] == 0
    assert is_openai_error(client.get("/api/keys", params={"group": "relay/nope"}, headers=AUTH), 404)
    assert is_openai_error(client.get("/api/keys", params={"group": "99"}, headers=AUTH), 404)
    assert is_openai_error(client.get("/api/keys", params={"group": "no-slash"}, headers=AUTH), 422)

    logged_in(client)
    page = client.get("/keys").text
    assert '<a href="/groups/2">relay/cheap</a>' in page and '<a href="/groups/4">azure/prod</a>' in page
    assert '<option value="1" selected>default/default</option>' in page  # where a bulk add goes by default
    filtered = client.get(f"/keys?group={CHEAP}").text
    assert "<h1>Upstream keys of relay/cheap</h1>" in filtered
    assert "…0002" in filtered and "…0001" not in filtered and "…0004" not in filtered
    assert f'<option value="{CHEAP}" selected>relay/cheap</option>' in filtered
    assert "No keys in relay/premium yet." in client.get(f"/keys?group={PREMIUM}").text


def test_keys_are_added_to_a_group_by_label_or_id(setup):
    client, path = setup
    by_label = client.post("/api/keys", json={"keys": [NEW_KEY], "group": "azure/prod"}, headers=AUTH)
    assert by_label.json() == {"added": [5], "duplicates": 0, "malformed_lines": []}
    assert client.get("/api/keys/5", headers=AUTH).json()["group"] == "azure/prod"
    other = "sk-good-routes-ffffffffffffffffffff0006"
    assert client.post("/api/keys", json={"keys": [other], "group_id": PREMIUM}, headers=AUTH).status_code == 200
    assert client.get("/api/keys/6", headers=AUTH).json()["group"] == "relay/premium"
    plain = "sk-good-routes-gggggggggggggggggggg0007"
    assert client.post("/api/keys", json={"keys": [plain]}, headers=AUTH).status_code == 200
    assert client.get("/api/keys/7", headers=AUTH).json()["group"] == "default/default"

    before = everything(client)
    late = "sk-good-routes-hhhhhhhhhhhhhhhhhhhh0008"
    for body, status in [
        ({"keys": [late], "group": "azure/nope"}, 404),
        ({"keys": [late], "group_id": 99}, 404),
        ({"keys": [late], "group": "nonsense"}, 422),
        ({"keys": [late], "group": "azure/prod", "group_id": CHEAP}, 422),
        ({"keys": [late], "group_id": 0}, 422),
    ]:
        assert is_openai_error(client.post("/api/keys", json=body, headers=AUTH), status), body
    assert everything(client) == before


# ---------------------------------------------------------------------------------------------------------------
# Models and fallbacks


def test_models_api_says_which_groups_serve_each_model_and_its_fallbacks(client):
    overview = client.get("/api/models", headers=AUTH).json()
    no_keys = "Cannot serve: no keys. Add one on the group's page."
    assert overview["every_model_groups"] == [
        {
            "id": PREMIUM,
            "label": "relay/premium",
            "priority": 5,
            "serving": True,
            "usable_keys": 0,
            "cannot_serve": no_keys,
        },
        {"id": DEFAULT_GROUP, "label": "default/default", "priority": 0, "serving": True, "usable_keys": 1}
        | {"cannot_serve": None},
    ]
    by_model = {m["model"]: m for m in overview["models"]}
    assert list(by_model) == ["gpt-4o", "gpt-4o-mini", "o1"]
    assert by_model["gpt-4o"]["groups"] == [
        {
            "id": PROD,
            "label": "azure/prod",
            "upstream_model": "prod-gpt4o",
            "source": "manual",
            "priority": 0,
            "serving": True,
            "usable_keys": 1,
            "cannot_serve": None,
        }
    ]
    # Listed by no group: the catch-all groups serve it, one of which has a usable key.
    assert by_model["o1"] == {
        "model": "o1",
        "groups": [],
        "fallbacks": ["gpt-4o-mini"],
        "usable_keys": 1,
        "cannot_serve": None,
    }

    changed = client.put("/api/models/gpt-4o/fallbacks", json={"fallbacks": ["gpt-4o-mini", "o1"]}, headers=AUTH)
    assert changed.json() == {"model": "gpt-4o", "fallbacks": ["gpt-4o-mini", "o1"]}
    assert client.put("/api/models/o1/fallbacks", json={"fallbacks": []}, headers=AUTH).json()["fallbacks"] == []
    assert "o1" not in {m["model"] for m in client.get("/api/models", headers=AUTH).json()["models"]}
    slashed = client.put("/api/models/openai/o3/fallbacks", json={"fallbacks": ["openai/o4-mini"]}, headers=AUTH)
    assert slashed.json() == {"model": "openai/o3", "fallbacks": ["openai/o4-mini"]}


@pytest.mark.parametrize(
    "url, body",
    [
        ("/api/models/o1/fallbacks", {"fallbacks": ["o1"]}),  # its own fallback
        ("/api/models/o1/fallbacks", {"fallbacks": ["has space"]}),
        ("/api/models/o1/fallbacks", {"fallbacks": [f"m{n}" for n in range(21)]}),
        ("/api/models/o1/fallbacks", {"fallbacks": "gpt-4o"}),
        ("/api/models/o1/fallbacks", {}),
        (f"/api/models/{'x' * 201}/fallbacks", {"fallbacks": []}),
    ],
)
def test_fallbacks_refuse_bad_input_clearly_and_change_nothing(setup, url, body):
    client, path = setup
    before, revision = everything(client), routes_revision(path)
    assert is_openai_error(client.put(url, json=body, headers=AUTH), 422)
    assert everything(client) == before and routes_revision(path) == revision


def test_models_page_lists_models_groups_catch_alls_and_edits_fallbacks(client):
    csrf = logged_in(client)
    page = client.get("/models").text
    assert '<a href="/groups/4">azure/prod</a> as <code>prod-gpt4o</code>' in page
    assert '<a href="/groups/2">relay/cheap</a>' in page
    assert (
        '<li><a href="/groups/3">relay/premium</a> <span class="meta">priority 5</span> <span class="cannot-serve">'
        in page
    )
    assert 'value="gpt-4o-mini" maxlength="4000" placeholder="none" aria-label="Fallbacks of o1"' in page
    saved = client.post("/models/fallbacks", data={"csrf": csrf, "model": "gpt-4o", "fallbacks": "gpt-4o-mini, o1"})
    assert saved.headers["location"] == "/models?done=fallbacks"
    assert "Fallbacks saved." in client.get("/models?done=fallbacks").text
    assert client.get("/api/models", headers=AUTH).json()["models"][0]["fallbacks"] == ["gpt-4o-mini", "o1"]
    refused = client.post("/models/fallbacks", data={"csrf": csrf, "model": "o1", "fallbacks": "o1"})
    assert refused.status_code == 422 and "cannot be its own fallback" in refused.text


# ---------------------------------------------------------------------------------------------------------------
# Flows by upstream and group


@pytest.mark.parametrize(
    "query, expected",
    [
        ("upstream=relay", [4, 3, 2]),
        (f"upstream={RELAY}", [4, 3, 2]),
        ("upstream=azure", [5]),
        ("group=relay/cheap", [4, 3, 2]),
        (f"group={PROD}", [5]),
        ("group=default/default", [1]),
        ("group=relay/premium", []),
        ("upstream=relay&status=2xx&model=o1", [4]),
        ("upstream=&group=", [6, 5, 4, 3, 2, 1]),  # the form submitted with "any"
    ],
)
def test_flows_filter_by_upstream_and_group(client, query, expected):
    assert flow_ids(client.get(f"/api/flows?{query}", headers=AUTH)) == expected


@pytest.mark.parametrize("query", ["upstream=nope", "group=relay/nope", "group=nonsense", "upstream=0"])
def test_an_unknown_upstream_or_group_filter_is_refused_clearly(client, query):
    assert is_openai_error(client.get(f"/api/flows?{query}", headers=AUTH), 422)


def test_flows_show_the_upstream_group_and_fallback_of_each_flow_and_attempt(client):
    listed = {f["id"]: f for f in client.get("/api/flows", headers=AUTH).json()["flows"]}
    assert (listed[2]["upstream"], listed[2]["group"]) == ("relay", "relay/cheap")
    assert (listed[6]["upstream"], listed[6]["group"]) == (None, None)
    assert (listed[4]["model"], listed[4]["fallback_model"]) == ("o1", "gpt-4o-mini")
    detail = client.get("/api/flows/4", headers=AUTH).json()
    assert [(a["attempt"], a["group"], a["model"]) for a in detail["attempt_list"]] == [
        (1, "default/default", None),
        (2, "relay/cheap", "gpt-4o-mini"),
    ]

    logged_in(client)
    page = client.get("/flows?stream=no").text
    assert 'href="/flows?stream=no&amp;group=2" title="Only this group">relay/<wbr>cheap</a>' in page
    assert 'title="asked o1, answered by gpt-4o-mini">answered by gpt-4o-mini</span>' in page
    assert '<option value="relay/cheap">relay/cheap</option>' in page and '<option value="azure">azure</option>' in page
    filtered = client.get("/flows?group=2").text
    assert '<option value="relay/cheap" selected>relay/cheap</option>' in filtered
    assert 'href="/api/flows/export.jsonl?group=relay%2Fcheap"' in filtered  # the exports keep the filter

    detail_page = client.get("/flows/4").text
    assert "asked o1, answered by gpt-4o-mini (a fallback)" in detail_page
    assert '<a href="/groups/2">relay/cheap</a>' in detail_page
    attempts = detail_page.split("<h2>Attempts</h2>")[1].split("</table>")[0]
    assert '<a href="/groups/1">default/<wbr>default</a>' in attempts
    assert '<td class="c-model" data-label="model">gpt-4o-mini</td>' in attempts
    retried = client.get("/flows/3").text.split("<h2>Attempts</h2>")[1].split("</table>")[0]
    assert '<a href="/groups/4">azure/<wbr>prod</a>' in retried


def test_flows_of_a_deleted_group_are_named_by_id_and_still_found(client):
    client.delete("/api/upstreams/azure", headers=AUTH)
    assert client.get("/api/flows/5", headers=AUTH).json()["group"] == f"#{PROD} (deleted)"
    assert flow_ids(client.get(f"/api/flows?group={PROD}", headers=AUTH)) == [5]
    assert flow_ids(client.get(f"/api/flows?upstream={AZURE}", headers=AUTH)) == [5]
    logged_in(client)
    page = client.get(f"/flows?group={PROD}").text
    assert f'<option value="{PROD}" selected>#{PROD} (deleted)</option>' in page


# ---------------------------------------------------------------------------------------------------------------
# Dashboard and /metrics


def test_dashboard_breaks_down_by_upstream_and_group(client):
    data = client.get("/api/dashboard", headers=AUTH).json()
    by_upstream = {r["label"]: r["requests"] for r in data["breakdowns"]["upstream_id"]}
    assert by_upstream == {"relay": 3, "default": 1, "azure": 1, None: 1}
    by_group = {r["label"]: (r["requests"], r["errors"]) for r in data["breakdowns"]["group_id"]}
    assert by_group == {"relay/cheap": (3, 0), "default/default": (1, 0), "azure/prod": (1, 1), None: (1, 1)}
    logged_in(client)
    page = client.get("/dashboard").text
    assert "<h3>By upstream</h3>" in page and "<h3>By group</h3>" in page
    assert f'<a href="/upstreams#upstream-{RELAY}">relay</a>' in page
    assert f'<a href="/groups/{CHEAP}">relay/<wbr>cheap</a>' in page
    assert f'<a href="/flows?group={CHEAP}" title="These flows">3</a>' in page
    assert f'<a href="/flows?upstream={RELAY}" title="These flows">3</a>' in page


def test_metrics_count_by_upstream_and_group_names(client):
    text = client.get("/metrics", headers=AUTH).text
    for line in (
        'keyrotor_upstream_requests_total{upstream="relay"} 3',
        'keyrotor_upstream_requests_total{upstream="(none)"} 1',
        'keyrotor_group_requests_total{group="relay/cheap"} 3',
        'keyrotor_group_errors_total{group="azure/prod"} 1',
        'keyrotor_group_tokens_total{group="relay/cheap",kind="prompt"} 30',
        'keyrotor_upstream_cost_usd_total{upstream="relay"} 0.000300',
        "# TYPE keyrotor_group_requests_total counter",
    ):
        assert line in text, line
    assert re.findall(r'="",|=""}', text) == []  # no empty label value anywhere
    client.delete("/api/upstreams/azure", headers=AUTH)
    text = client.get("/metrics", headers=AUTH).text
    assert f'keyrotor_upstream_requests_total{{upstream="#{AZURE} (deleted)"}} 1' in text
    assert f'keyrotor_group_requests_total{{group="#{PROD} (deleted)"}} 1' in text


# ---------------------------------------------------------------------------------------------------------------
# Names are text, never markup


@pytest.fixture
def evil(setup) -> TestClient:
    """Names run.py accepts but the UI would not: the pages must show them as text."""
    client, path = setup
    conn = db.connect(path)
    upstream_id = routes.add_upstream(conn, EVIL_NAME, "https://evil.example", Dialect.OPENAI, None)
    group_id = routes.add_group(conn, f"{EVIL_NAME}/{EVIL_NAME}")
    routes.add_model(conn, group_id, EVIL, EVIL)
    routes.set_fallbacks(conn, EVIL, [f"{EVIL}-2"])
    add_keys(SqliteKeyStore(conn, secrets.key_cipher(path)), [NEW_KEY], group_id=group_id)
    write_flows(
        conn, [row(7, model=EVIL, upstream_id=upstream_id, group_id=group_id, fallback_model=EVIL, upstream_key_id=5)]
    )
    conn.close()
    logged_in(client)
    return client


@pytest.mark.parametrize(
    "url", ["/upstreams", "/groups/5", "/models", "/keys", "/keys?group=5", "/flows", "/flows/7", "/dashboard"]
)
def test_names_with_markup_are_escaped(evil, url):
    response = evil.get(url)
    assert response.status_code == 200
    page = response.text.replace('<script src="/static/app.js" defer></script>', "")  # our own, from /static
    assert "<script" not in page.lower() and "<img" not in page.lower()
    assert "&lt;img src=x onerror=alert(1)&gt;" in page


def test_names_with_markup_come_back_verbatim_in_json(evil):
    labels = [g["label"] for g in evil.get("/api/groups", headers=AUTH).json()["groups"]]
    assert f"{EVIL_NAME}/{EVIL_NAME}" in labels
    assert evil.get("/api/flows/7", headers=AUTH).json()["group"] == f"{EVIL_NAME}/{EVIL_NAME}"
    text = evil.get("/metrics", headers=AUTH).text
    assert f'keyrotor_upstream_requests_total{{upstream="{EVIL_NAME}"}} 1' in text
