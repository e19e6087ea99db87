"""The login page when the address is refused for too many wrong admin keys: the form again with the wait
in a sentence (never the 429's JSON), the same wait on GET /login, and the right key still accepted."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from config import load_settings
from core import login_throttle
from monitor_ui.app import create_app
from storage import db

ADMIN = "kra-login-wait-admin-key-0123456789abcdef"
WAIT = re.compile(r"Too many wrong admin keys from this address: try again in (\d+) s\b")


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    monkeypatch.setenv("KEYROTOR_ADMIN_KEY", ADMIN)
    monkeypatch.delenv("KEYROTOR_SECRET", raising=False)
    monkeypatch.setattr(login_throttle, "FIRST_DELAY_SECONDS", 0.001)
    monkeypatch.setattr(login_throttle, "MAX_DELAY_SECONDS", 0.01)
    settings = load_settings(overrides={"storage.path": str(tmp_path / "kr.db")}, environ={})
    db.ensure_database(settings.storage_path)
    with TestClient(create_app(settings), follow_redirects=False, client=("192.0.2.7", 50000)) as c:
        yield c


def test_a_refused_address_sees_the_wait_on_the_page_and_the_right_key_still_works(client: TestClient):
    assert WAIT.search(client.get("/login").text) is None  # nobody guessed yet
    statuses = [client.post("/login", data={"admin_key": "kra-wrong"}).status_code for _ in range(8)]
    assert statuses[:5] == [401] * 5 and statuses[-1] == 429

    refused = client.post("/login", data={"admin_key": "kra-wrong", "next": "/flows"})
    assert refused.status_code == 429 and refused.headers["content-type"].startswith("text/html")
    seconds = int(refused.headers["retry-after"])
    shown = WAIT.search(refused.text)
    assert shown and int(shown.group(1)) == seconds and 0 < seconds <= login_throttle.LOCK_SECONDS
    assert f'data-retry-after="{seconds}"' in refused.text  # app.js counts it down
    assert '{"error"' not in refused.text and 'name="admin_key"' in refused.text  # the form, not JSON
    assert '<input type="hidden" name="next" value="/flows">' in refused.text

    page = client.get("/login")
    assert page.status_code == 200 and WAIT.search(page.text)

    # The API is answered as before: the OpenAI-shaped JSON, with Retry-After.
    api = client.get("/api/flows", headers={"Authorization": "Bearer kra-wrong"})
    assert api.status_code == 429 and api.json()["error"]["code"] == "429" and "retry-after" in api.headers

    accepted = client.post("/login", data={"admin_key": ADMIN, "next": "/flows"})
    assert accepted.status_code == 303 and accepted.headers["location"] == "/flows"
    assert WAIT.search(client.get("/login").text) is None  # the right key cleared the address's count
