"""Alerts: each condition read from storage, sent once to a real webhook receiver on a loopback port,
again only after it cleared; failures retried a bounded number of times and logged without the URL's secret."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from config import AlertSettings
from core.limits import spend_name
from core.records import FlowRecord
from monitor_ui import alerting
from monitor_ui.alerting import Alerting
from storage import client_keys, db, rollups, upstream_keys
from storage.secrets import key_cipher
from storage.upstream_keys import SqliteKeyStore
from tests.conftest import wait_for
from tests.monitor_ui.conftest import OpenUI, log_in
from usecases.keys import add_keys

SECRET_PATH = "/services/T000/B000/very-secret-token"


class Receiver:
    """A webhook receiver on a free loopback port: keeps every JSON body; fails the first `failures` posts."""

    def __init__(self, failures: int = 0) -> None:
        self.bodies: list[dict] = []
        self.posts = 0
        self.failures = failures
        received = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                received.posts += 1
                if received.posts <= received.failures:
                    self.send_response(500)
                    self.end_headers()
                    return
                received.bodies.append(json.loads(body))
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}{SECRET_PATH}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def kinds(self) -> list[str]:
        return sorted(b["keyrotor"]["kind"] for b in self.bodies)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found = Receiver()
    yield found
    found.close()


@pytest.fixture(autouse=True)
def _no_waiting_between_tries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(alerting, "RETRY_DELAYS_SECONDS", (0.0,))


def settings_for(url: str, **changes: object) -> AlertSettings:
    return AlertSettings(webhook_url=url, check_seconds=3600, error_min_requests=10, **changes)  # type: ignore[arg-type]


def set_spend(conn: sqlite3.Connection, client_id: int, usd: float) -> None:
    with conn:
        conn.execute(
            "INSERT INTO limit_counters (name, value, updated_at) VALUES (?, ?, ?)"
            " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            (spend_name(client_id, "usd", "day", time.time()), usd, time.time()),
        )


def set_key_state(conn: sqlite3.Connection, key_id: int, state: str) -> None:
    with conn:
        upstream_keys.record_state(conn, key_id, state, "upstream said so" if state != "active" else None, None, 0)


def add_failures(conn: sqlite3.Connection, errors: int, ok: int) -> None:
    now = time.time()
    records = [FlowRecord(f"f{i}", now, "POST", "/v1/chat/completions", status=500) for i in range(errors)]
    records += [FlowRecord(f"g{i}", now, "POST", "/v1/chat/completions", status=200) for i in range(ok)]
    with conn:
        rollups.add_records(conn, records)


@pytest.fixture
def troubled(database: Path) -> Iterator[tuple[Path, sqlite3.Connection, int]]:
    """A client at 85 % of its $1 daily budget, the default group's only key invalid, 15 of 20 requests failed."""
    conn = db.connect(database)
    client_keys.create_client(conn, "alice", client_keys.policy_of('{"daily_usd": 1.0}'))
    client_id = client_keys.client_row(conn, "alice")["id"]
    set_spend(conn, client_id, 0.85)
    report = add_keys(SqliteKeyStore(conn, key_cipher(database)), ["sk-good-aaaaaaaaaaaaaaaaaaaaaaaa0001"])
    set_key_state(conn, report.added[0], "invalid")
    add_failures(conn, errors=15, ok=5)
    yield database, conn, client_id
    conn.close()


def test_each_condition_is_sent_once_until_it_clears(troubled, receiver: Receiver):
    database, conn, client_id = troubled
    alerts = Alerting(database, settings_for(receiver.url))
    alerts.start()  # the first check runs at once; the next not for an hour
    try:
        wait_for(lambda: len(receiver.bodies) >= 4, what="four alerts at the receiver")
        assert receiver.kinds() == ["budget", "error_rate", "group_unusable", "key_state"]
        assert alerts.check_once() == [] and alerts.check_once() == []  # still true: not raised again
        by_kind = {b["keyrotor"]["kind"]: b for b in receiver.bodies}
        assert by_kind["budget"]["keyrotor"]["details"]["threshold_percent"] == 80
        assert "alice" in by_kind["budget"]["text"] and "85 %" in by_kind["budget"]["text"]
        assert by_kind["key_state"]["keyrotor"]["details"]["state"] == "invalid"
        assert "default/default" in by_kind["group_unusable"]["text"]
        assert by_kind["error_rate"]["keyrotor"]["details"]["error_rate_percent"] == 75.0
        for body in receiver.bodies:  # Slack reads "text"; a generic receiver the structured fields
            assert body["text"].startswith("keyrotor alert: ") and body["keyrotor"]["state"] == "raised"
        wait_for(lambda: conn.execute("SELECT count(*) FROM alerts WHERE sent_at IS NULL").fetchone()[0] == 0)

        set_spend(conn, client_id, 1.2)  # past 100 %: a new condition, the 80 % one clears
        set_key_state(conn, 1, "active")  # the key and the group recover
        opened = alerts.check_once()
        assert [a["kind"] for a in opened] == ["budget"] and opened[0]["details"]["threshold_percent"] == 100
        wait_for(lambda: len(receiver.bodies) == 5, what="the 100 % alert")
        open_kinds = sorted(r[0] for r in conn.execute("SELECT kind FROM alerts WHERE cleared_at IS NULL"))
        assert open_kinds == ["budget", "error_rate"]

        set_key_state(conn, 1, "exhausted")  # wrong again: raised again, once
        assert sorted(a["kind"] for a in alerts.check_once()) == ["group_unusable", "key_state"]
        assert alerts.check_once() == []
        wait_for(lambda: len(receiver.bodies) == 7, what="the key and group alerts again")
    finally:
        alerts.stop()
    assert len(receiver.bodies) == 7


def test_below_every_threshold_nothing_is_raised(database: Path, receiver: Receiver):
    conn = db.connect(database)
    try:
        client_keys.create_client(conn, "bob", client_keys.policy_of('{"monthly_usd": 10.0}'))
        add_keys(SqliteKeyStore(conn, key_cipher(database)), ["sk-good-aaaaaaaaaaaaaaaaaaaaaaaa0001"])
        set_spend(conn, client_keys.client_row(conn, "bob")["id"], 7.9)  # a day's spend: no daily budget
        add_failures(conn, errors=9, ok=0)  # under error_min_requests
    finally:
        conn.close()
    assert Alerting(database, settings_for(receiver.url)).check_once() == []


def test_a_failing_webhook_is_retried_a_bounded_number_of_times_and_logged_without_its_secret(
    troubled, caplog: pytest.LogCaptureFixture
):
    database, conn, _ = troubled
    flaky = Receiver(failures=2)
    try:
        alerts = Alerting(database, settings_for(flaky.url, send_attempts=3))
        with caplog.at_level(logging.WARNING, logger="monitor_ui.alerting"):
            delivered = alerts.send(alerts.check_once()[0])
            assert delivered.ok and delivered.attempts == 3 and len(flaky.bodies) == 1
            down = Receiver(failures=100)
            try:
                failed = Alerting(database, settings_for(down.url, send_attempts=2)).send_test()
            finally:
                down.close()
        assert not failed.ok and failed.attempts == 2 and failed.error == "HTTP 500" and down.posts == 2
        assert "failed (try 1 of 3): HTTP 500" in caplog.text
        assert "very-secret-token" not in caplog.text and "/services/" not in caplog.text
    finally:
        flaky.close()


def test_the_test_alert_button_api_and_command(open_ui: OpenUI, receiver: Receiver, keyrotor) -> None:
    client = open_ui("admin", {"alerts.webhook_url": receiver.url})
    auth = {"authorization": "Bearer admin"}
    answer = client.post("/api/alerts/test", headers=auth)
    assert answer.status_code == 200 and answer.json() == {"sent": True, "error": None, "attempts": 1}
    assert receiver.bodies[-1]["keyrotor"]["kind"] == "test" and "test alert" in receiver.bodies[-1]["text"]
    assert client.post("/api/alerts/test").status_code == 401  # admin only
    listed = client.get("/api/alerts", headers=auth)
    assert listed.status_code == 200 and set(listed.json()) == {"open", "recent"}

    keyrotor.env["KEYROTOR_ALERTS_WEBHOOK_URL"] = receiver.url
    sent = keyrotor.setup("alerts", "test")
    assert sent.returncode == 0 and "Test alert sent to http://127.0.0.1" in sent.stdout
    assert "very-secret-token" not in sent.stdout
    assert [b["keyrotor"]["kind"] for b in receiver.bodies] == ["test", "test"]
    del keyrotor.env["KEYROTOR_ALERTS_WEBHOOK_URL"]
    unset = keyrotor.setup("alerts", "test", check=False)
    assert unset.returncode == 1 and "set [alerts] webhook_url" in unset.stdout


def test_the_dashboard_shows_open_alerts_and_its_button_sends_a_test(open_ui: OpenUI, receiver: Receiver) -> None:
    def seed(conn: sqlite3.Connection, path: Path) -> None:
        report = add_keys(SqliteKeyStore(conn, key_cipher(path)), ["sk-good-aaaaaaaaaaaaaaaaaaaaaaaa0001"])
        set_key_state(conn, report.added[0], "exhausted")

    client = open_ui("admin", {"alerts.webhook_url": receiver.url}, seed)  # the app checks as it starts
    auth = {"authorization": "Bearer admin"}
    opened = wait_for(lambda: client.get("/api/alerts", headers=auth).json()["open"], what="the open alerts")
    assert sorted(a["kind"] for a in opened) == ["group_unusable", "key_state"]
    csrf = log_in(client, "admin", "/dashboard")
    page = client.get("/dashboard").text
    assert "Upstream key #1 (…0001) is exhausted" in page and "Group default/default has no usable key" in page
    assert client.post("/alerts/test", data={}).status_code == 403  # no CSRF token
    sent = client.post("/alerts/test", data={"csrf": csrf})
    assert sent.status_code == 303 and sent.headers["location"] == "/dashboard?test_alert=sent#alerts"
    assert "The test alert was sent to the webhook." in client.get("/dashboard?test_alert=sent").text
    assert [b["keyrotor"]["kind"] for b in receiver.bodies].count("test") == 1
