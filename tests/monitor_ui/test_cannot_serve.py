"""A group that cannot serve for want of a key, and the models left without a usable key: in red on the
upstreams, group and models pages, and the same fact in their JSON twins, from the stored key states."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from core.routing import Dialect
from storage import routes, secrets, upstream_keys
from storage.upstream_keys import SqliteKeyStore
from tests.monitor_ui.conftest import log_in
from usecases.keys import add_keys

ADMIN = "kra-cannot-serve-admin-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
DEFAULT_GROUP, EMPTY, SPENT, RESTING, HEALTHY, OFF = 1, 2, 3, 4, 5, 6
KEYS = [f"sk-good-serve-{c * 24}{n:04d}" for n, c in enumerate("abcdefgh", start=1)]


@pytest.fixture
def client(open_ui, upstream) -> TestClient:
    def seed(conn, path: Path) -> None:
        routes.add_upstream(conn, "relay", upstream.url, Dialect.OPENAI, None)
        assert routes.add_group(conn, "relay/empty") == EMPTY  # no key at all
        assert routes.add_group(conn, "relay/spent") == SPENT  # keys, none usable
        assert routes.add_group(conn, "relay/resting") == RESTING  # its one key cools for a while yet
        assert routes.add_group(conn, "relay/healthy") == HEALTHY  # one bad key, one good
        assert routes.add_group(conn, "relay/off") == OFF  # a good key, but the group is disabled
        routes.set_group_enabled(conn, OFF, False)
        for group, model in [
            (EMPTY, "gpt-4o-mini-2024-07-18"),
            (SPENT, "gpt-4o-mini-2024-07-18"),
            (SPENT, "o1"),
            (RESTING, "o1"),
            (HEALTHY, "gpt-4o"),
            (OFF, "o3-mini"),
        ]:
            routes.add_model(conn, group, model, None)
        routes.set_fallbacks(conn, "o1", ["gpt-4o"])
        store = SqliteKeyStore(conn, secrets.key_cipher(path))
        add_keys(store, [KEYS[0]])  # default/default: serves every model no group lists
        add_keys(store, KEYS[1:4], group_id=SPENT)
        add_keys(store, [KEYS[4]], group_id=RESTING)
        add_keys(store, KEYS[5:7], group_id=HEALTHY)
        add_keys(store, [KEYS[7]], group_id=OFF)
        now = time.time()
        for key_id, state, until in [(2, "invalid", None), (3, "exhausted", None), (4, "disabled", None)]:
            upstream_keys.record_state(conn, key_id, state, "seeded", until, now)
        upstream_keys.record_state(conn, 5, "cooling", "rate limited", now + 600, now)
        upstream_keys.record_state(conn, 6, "invalid", "seeded", None, now)
        conn.commit()

    return open_ui(ADMIN, {"proxy.upstream": upstream.url}, seed)


def groups_json(client: TestClient) -> dict[str, dict]:
    return {g["label"]: g for g in client.get("/api/groups", headers=AUTH).json()["groups"]}


def test_the_json_twins_say_which_groups_cannot_serve_and_why(client):
    groups = groups_json(client)
    facts = {label: (g["keys"], g["usable_keys"], g["cannot_serve"]) for label, g in groups.items()}
    assert facts["relay/empty"] == (0, 0, "Cannot serve: no keys. Add one on the group's page.")
    none_usable = "Cannot serve now: none of its {} key(s) is usable (invalid, exhausted, disabled or cooling)."
    assert facts["relay/spent"] == (3, 0, none_usable.format(3))
    assert facts["relay/resting"] == (1, 0, none_usable.format(1))
    assert facts["relay/healthy"] == (2, 1, None)
    assert facts["default/default"] == (1, 1, None)
    assert facts["relay/off"] == (1, 1, None) and groups["relay/off"]["serving"] is False  # disabled, not keyless

    assert client.get(f"/api/groups/{SPENT}", headers=AUTH).json()["cannot_serve"] == none_usable.format(3)
    (relay,) = [u for u in client.get("/api/upstreams", headers=AUTH).json()["upstreams"] if u["name"] == "relay"]
    assert {g["label"]: g["cannot_serve"] is not None for g in relay["group_list"]} == {
        "relay/empty": True,
        "relay/spent": True,
        "relay/resting": True,
        "relay/healthy": False,
        "relay/off": False,
    }


def test_the_models_twin_says_which_models_have_no_usable_key_now(client):
    overview = client.get("/api/models", headers=AUTH).json()
    models = {m["model"]: m for m in overview["models"]}
    assert {name: (m["usable_keys"], m["cannot_serve"]) for name, m in models.items()} == {
        "gpt-4o": (1, None),
        "gpt-4o-mini-2024-07-18": (
            0,
            "No usable key for gpt-4o-mini-2024-07-18 now: every group that serves it has none.",
        ),
        "o1": (0, "No usable key for o1 now: every group that serves it has none."),
        "o3-mini": (0, "No enabled group serves o3-mini."),
    }
    by_group = {g["label"]: g["cannot_serve"] for g in models["o1"]["groups"]}
    assert set(by_group) == {"relay/spent", "relay/resting"} and all(by_group.values())
    assert overview["every_model_groups"][0]["cannot_serve"] is None  # default/default has its key


def test_a_key_coming_back_or_going_away_changes_the_fact(client):
    assert groups_json(client)["relay/healthy"]["cannot_serve"] is None
    assert client.post("/api/keys/7/disable", headers=AUTH).status_code == 200  # its one usable key
    assert groups_json(client)["relay/healthy"]["cannot_serve"] is not None
    gpt4o = {m["model"]: m for m in client.get("/api/models", headers=AUTH).json()["models"]}["gpt-4o"]
    assert gpt4o["cannot_serve"] is not None
    assert client.post("/api/keys/3/enable", headers=AUTH).status_code == 200  # spent's exhausted key, by hand
    assert groups_json(client)["relay/spent"]["usable_keys"] == 1
    assert groups_json(client)["relay/spent"]["cannot_serve"] is None


def test_a_cooling_key_whose_rest_is_over_is_usable(client, ui_db_path: Path):
    from storage import db

    conn = db.connect(ui_db_path)
    upstream_keys.record_state(conn, 5, "cooling", "rate limited", time.time() - 1, time.time())
    conn.commit()
    conn.close()
    assert groups_json(client)["relay/resting"]["cannot_serve"] is None


def test_the_pages_say_it_in_red(client):
    log_in(client, ADMIN, page="/upstreams")
    upstreams = client.get("/upstreams").text
    empty_row = re.search(r'<tr id="group-2">.*?</tr>', upstreams, flags=re.S).group(0)
    assert '<span class="badge state-invalid">cannot serve</span>' in empty_row
    assert '<span class="cannot-serve">Cannot serve: no keys.' in empty_row
    healthy_row = re.search(r'<tr id="group-5">.*?</tr>', upstreams, flags=re.S).group(0)
    assert "cannot-serve" not in healthy_row and "state-active" in healthy_row

    group = client.get(f"/groups/{SPENT}").text
    assert '<p class="cannot-serve" role="alert">Cannot serve now: none of its 3 key(s) is usable' in group
    assert "3, 0 usable now" in group
    assert "cannot-serve" not in client.get(f"/groups/{HEALTHY}").text

    models = client.get("/models").text
    warning = re.search(r'<p class="cannot-serve" role="alert" id="models-without-key">(.*?)</p>', models, re.S)
    assert warning and "No usable key now for 3 model(s)" in warning.group(1)
    assert re.findall(r'<a href="#model-\d">([^<]+)</a>', warning.group(1)) == [
        "gpt-4o-mini-2024-07-18",
        "o1",
        "o3-mini",
    ]
    gpt4o = re.search(r'<tr id="model-1">.*?</tr>', models, flags=re.S).group(0)
    assert "<code>gpt-4o</code>" in gpt4o and "cannot-serve" not in gpt4o and "unserved" not in gpt4o
    o1 = re.search(r'<tr id="model-3" class="unserved">.*?</tr>', models, flags=re.S).group(0)
    assert '<span class="badge state-invalid">no usable key</span>' in o1 and "Its fallbacks are tried." in o1
