"""What the monitor UI's tests share: the app on a fresh database, logging in, flows stored as the capture
writer stores them, and the checks every page passes."""

from __future__ import annotations

import json
import os
import re
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from config import load_settings
from core.records import FlowRecord
from monitor_ui.app import create_app
from storage import db, flows, outcomes, rollups

OpenUI = Callable[..., TestClient]
Seed = Callable[[sqlite3.Connection, Path], object]


@pytest.fixture
def ui_db_path(tmp_path: Path) -> Path:
    """The database `open_ui` opens the UI on."""
    return tmp_path / "kr.db"


@pytest.fixture
def open_ui(ui_db_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[OpenUI]:
    """Opens the monitor UI on a fresh database (`ui_db_path`) whose admin key is `admin`.

    `settings` are overrides beside storage.path; `seed(conn, path)` fills the database before the
    app starts. The client follows no redirects; it is closed after the test. With
    KEYROTOR_TEST_STORAGE=postgresql the UI's data is in a fresh PostgreSQL database instead
    (storage.url; a run of these tests on PostgreSQL, docs/postgresql.md).
    """
    on_postgres = os.environ.get("KEYROTOR_TEST_STORAGE") == "postgresql"
    with ExitStack() as opened:
        if on_postgres:
            opened.callback(db.use_postgres, None)

        def open_ui(admin: str, settings: dict[str, str] | None = None, seed: Seed | None = None) -> TestClient:
            # storage.secrets reads these from os.environ, not from the settings.
            monkeypatch.setenv("KEYROTOR_ADMIN_KEY", admin)
            monkeypatch.delenv("KEYROTOR_SECRET", raising=False)
            overrides = {"storage.path": str(ui_db_path), **(settings or {})}
            if on_postgres:
                overrides["storage.url"] = request.getfixturevalue("postgres_url")
                db.use_postgres(overrides["storage.url"])
            loaded = load_settings(overrides=overrides, environ={})
            path = loaded.storage_path
            db.ensure_database(path)
            if seed is not None:
                conn = db.connect(path)
                try:
                    seed(conn, path)
                finally:
                    conn.close()
            return opened.enter_context(TestClient(create_app(loaded), follow_redirects=False))

        yield open_ui


def csrf_of(page: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', page).group(1)


def log_in(client: TestClient, admin: str, page: str = "/flows") -> str:
    """Log in with `admin`; returns the CSRF token of the session's pages, as `page` carries it."""
    assert client.post("/login", data={"admin_key": admin}).status_code == 303
    return csrf_of(client.get(page).text)


def stored_flow(n: int, now: float, **overrides: Any) -> dict[str, Any]:
    """Flow `n` as FlowRecord's fields: a chat completion started at `now - 100 + n`, answered 200 in 200 ms."""
    base = {
        "flow_id": f"flow-{n}",
        "started_at": now - 100 + n,
        "first_byte_at": now - 100 + n + 0.05,
        "ended_at": now - 100 + n + 0.2,
        "duration_ms": 200.0,
        "method": "POST",
        "path": "/v1/chat/completions",
        "status": 200,
        "model": "gpt-4o-mini",
        "stream": 0,
        "upstream_key_id": 1,
        "attempts": 1,
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "total_tokens": 15,
        "cost": 0.0001,
        "request_headers": [["content-type", "application/json"]],
        "response_headers": [["content-type", "application/json"]],
        "request_body": json.dumps({"model": overrides.get("model", "gpt-4o-mini"), "messages": []}),
        "response_body": json.dumps({"choices": [{"message": {"content": f"answer {n}"}}]}),
    }
    return base | overrides


def write_flows(conn: sqlite3.Connection, rows: list[dict[str, Any]]) -> None:
    """What the capture writer does with a batch."""
    records = [FlowRecord(**r) for r in rows]
    with conn:
        flows.insert_batch(conn, records)
        rollups.add_records(conn, records)
        outcomes.add_records(conn, records)


def flow_ids(response) -> list[int]:
    return [f["id"] for f in response.json()["flows"]]


def assert_sent_to_login(response) -> None:
    assert response.status_code == 303 and response.headers["location"].startswith("/login?next=")


def assert_served(response) -> None:
    """Answered, under the content security policy every page and twin carries."""
    assert response.status_code == 200, response.text[:300]
    assert response.headers["content-security-policy"].startswith("default-src 'none'")
