"""The workbench's routes (docs/workbench.md) need the admin credential, and refuse bad input with a clear 4xx
before anything is sent; the compare view escapes captured text."""

from __future__ import annotations

import json
import time

import pytest
from fastapi.testclient import TestClient

from storage import client_keys
from tests.monitor_ui.conftest import assert_sent_to_login, csrf_of, log_in, stored_flow, write_flows

ADMIN = "kra-workbench-test-admin-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
HOSTILE = '<script>alert("x")</script>'


def seed(conn, path) -> None:
    now = time.time()
    client_keys.create_client(conn, "alice")
    write_flows(
        conn,
        [
            stored_flow(1, now, client_id=None),
            stored_flow(
                2,
                now,
                client_id=1,
                response_body=json.dumps({"choices": [{"message": {"content": f"answer {HOSTILE} two"}}]}),
                client_request={"url": "https://up/v1/chat/completions", "headers": [["authorization", "sk-real"]]},
            ),
            stored_flow(3, now, client_id=1, request_body_truncated=1),
            stored_flow(4, now, client_id=2),
        ],
    )


@pytest.fixture
def client(open_ui) -> TestClient:
    return open_ui(ADMIN, seed=seed)


API = [
    ("POST", "/api/flows/1/replay"),
    ("GET", "/api/flows/compare?a=1&b=2"),
    ("POST", "/api/flows/replays"),
    ("GET", "/api/flows/replays/abc"),
]
PAGES = [("GET", "/flows/compare?a=1&b=2"), ("GET", "/flows/replays/abc")]
FORMS = [("POST", "/flows/1/replay"), ("POST", "/flows/replays")]


@pytest.mark.parametrize("method, url", API)
def test_every_api_route_needs_the_admin(client: TestClient, method: str, url: str):
    response = client.request(method, url, json={})
    assert response.status_code == 401
    wrong = client.request(method, url, json={}, headers={"Authorization": "Bearer kra-not-the-admin-key-000000000000"})
    assert wrong.status_code == 401


@pytest.mark.parametrize("method, url", PAGES + FORMS)
def test_every_page_and_form_sends_a_stranger_to_log_in(client: TestClient, method: str, url: str):
    assert_sent_to_login(client.request(method, url, data={"csrf": "forged"}))


def test_a_form_needs_the_session_s_csrf_token(client: TestClient):
    log_in(client, ADMIN)
    for _, url in FORMS:
        assert client.post(url, data={"csrf": "forged"}).status_code == 403


@pytest.mark.parametrize(
    "url, body, status, words",
    [
        ("/api/flows/99/replay", {}, 404, "No flow"),
        ("/api/flows/1/replay", {}, 409, "no client"),
        ("/api/flows/3/replay", {}, 409, "not kept whole"),
        ("/api/flows/4/replay", {}, 409, "has been deleted"),
        ("/api/flows/2/replay", {"group": "nowhere/none"}, 404, "no upstream group"),
        ("/api/flows/2/replay", {"key": 77}, 404, "no upstream key #77"),
        ("/api/flows/2/replay", {"client": "nobody"}, 404, "no client"),
        ("/api/flows/2/replay", {"body": "not json", "model": "m"}, 400, "JSON body"),
        ("/api/flows/2/replay", {"key": 0}, 422, "key"),
    ],
)
def test_a_replay_that_cannot_be_sent_is_refused_before_anything_is_sent(client, url, body, status, words):
    answer = client.post(url, json=body, headers=AUTH)
    assert answer.status_code == status, answer.text
    assert words.lower() in answer.json()["error"]["message"].lower()


def test_compare_escapes_captured_text_and_shows_the_word_diff(client: TestClient):
    compared = client.get("/api/flows/compare?a=1&b=2", headers=AUTH).json()
    assert compared["text"] == {
        "a": "answer 1",
        "b": f"answer {HOSTILE} two",
        "identical": False,
        "similarity": compared["text"]["similarity"],
        "diff": compared["text"]["diff"],
    }
    assert {"op": "removed", "text": "1"} in compared["text"]["diff"]
    log_in(client, ADMIN)
    page = client.get("/flows/compare?a=1&b=2").text
    assert HOSTILE not in page and "&lt;script&gt;" in page
    assert client.get("/flows/compare?a=1&b=99").status_code == 404


def test_a_flow_page_never_shows_a_credential_header_s_value(client: TestClient):
    log_in(client, ADMIN)
    page = client.get("/flows/2").text
    detail = client.get("/api/flows/2", headers=AUTH).text
    assert "sk-real" not in page and "sk-real" not in detail
    assert "Send again" in page and csrf_of(page)


def test_a_replay_while_the_proxy_is_down_is_a_clear_502(open_ui):
    from tests.conftest import free_port

    client = open_ui(ADMIN, settings={"proxy.port": str(free_port())}, seed=seed)
    answer = client.post("/api/flows/2/replay", json={}, headers=AUTH)
    assert answer.status_code == 502 and "is it running" in answer.json()["error"]["message"]
