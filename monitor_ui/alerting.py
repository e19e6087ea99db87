"""Alerts, owned by the UI process: conditions read from storage, raised once, sent to the webhook.

Why the UI process: every condition is in storage (budgets in the saved counters, key states,
groups, the minute rollups), whichever proxy or worker learnt it; and there is one UI process
however many proxies run, so each alert has one sender. The unique index on open alerts
(storage/alerts.py) keeps "once per condition" even across two UI processes: only the one
whose insert took place sends. The checks run in a thread of their own every
`alerts.check_seconds`; sending runs in another, so a slow receiver never holds up a check,
a page or a request. A failed send is retried `alerts.send_attempts` times and logged with the
receiver's host only (a Slack webhook's path is its secret).
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from config import AlertSettings
from core import alerts as rules
from monitor_ui.names import key_label
from storage import alerts, client_keys, counters, db, rollups

log = logging.getLogger(__name__)

SEND_TIMEOUT_SECONDS = 5.0
RETRY_DELAYS_SECONDS = (1.0, 2.0, 4.0, 8.0)


def receiver_of(url: str) -> str:
    """The webhook as a log line may name it: scheme and host, never its path or query (its token)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or '?'}"


def conditions(conn: sqlite3.Connection, settings: AlertSettings, now: float) -> list[rules.Condition]:
    """Every alert condition that holds now, from storage."""
    found: list[rules.Condition] = []
    found += rules.budget_conditions(_budgets(conn, now), settings.budget_percents)
    keys = conn.execute(
        "SELECT id, name, last4, state, state_reason FROM upstream_keys"
        " WHERE state IN ('invalid', 'exhausted') ORDER BY id LIMIT 1000"
    ).fetchall()
    labelled = [(k["id"], key_label(k["id"], k["name"], k["last4"]), k["state"], k["state_reason"]) for k in keys]
    found += rules.key_conditions(labelled)
    groups = conn.execute(
        "SELECT g.id, u.name || '/' || g.name AS label, count(k.id) AS keys,"
        " sum(CASE WHEN k.state IN ('active', 'cooling') THEN 1 ELSE 0 END) AS usable"
        " FROM groups g JOIN upstreams u ON g.upstream_id = u.id LEFT JOIN upstream_keys k ON k.group_id = g.id"
        " WHERE g.enabled = 1 AND u.enabled = 1 GROUP BY g.id, u.name, g.name ORDER BY g.id LIMIT 1000"
    ).fetchall()
    found += rules.group_conditions([(g["id"], g["label"], g["keys"], g["usable"] or 0) for g in groups])
    window = settings.error_window_minutes
    since = int((now - window * 60) // 60) * 60 + 60  # the last `window` whole-or-current minutes
    recent = rollups.totals(conn, "minute", since)
    found += rules.error_rate_condition(
        recent.requests, recent.errors, settings.error_rate_percent, settings.error_min_requests, window
    )
    return found


def _budgets(conn: sqlite3.Connection, now: float) -> list[rules.ClientBudget]:
    rows = conn.execute(
        "SELECT id, name, limits FROM clients WHERE enabled = 1 AND limits IS NOT NULL AND limits != '{}' LIMIT 10000"
    ).fetchall()
    limited = []
    for row in rows:
        policy = client_keys.policy_of(row["limits"])
        for name, kind, _ in rules.BUDGETS:
            limit = getattr(policy, name, None)
            if limit:
                limited.append((row["id"], row["name"], name, kind, float(limit)))
    spend = counters.clients_spend(conn, sorted({c[0] for c in limited}), now)
    return [
        rules.ClientBudget(client_id, client, name, limit, spend.get(client_id, {}).get(kind, 0.0))
        for client_id, client, name, kind, limit in limited
    ]


@dataclass
class Delivery:
    ok: bool
    error: str | None = None
    attempts: int = 0


def post_alert(
    url: str, body: dict, attempts: int, sleep: Callable[[float], None] = time.sleep, client: httpx.Client | None = None
) -> Delivery:
    """POST one alert, trying up to `attempts` times; what went wrong is logged without the URL's path."""
    error = None
    own = client is None
    client = client or httpx.Client(timeout=SEND_TIMEOUT_SECONDS, follow_redirects=False)
    try:
        for attempt in range(1, attempts + 1):
            try:
                response = client.post(url, json=body)
                if response.status_code < 300:
                    return Delivery(True, None, attempt)
                error = f"HTTP {response.status_code}"
            except httpx.HTTPError as e:
                error = type(e).__name__
            log.warning("Alert webhook to %s failed (try %d of %d): %s", receiver_of(url), attempt, attempts, error)
            if attempt < attempts:
                sleep(RETRY_DELAYS_SECONDS[min(attempt - 1, len(RETRY_DELAYS_SECONDS) - 1)])
    finally:
        if own:
            client.close()
    return Delivery(False, error, attempts)


def test_alert(now: float) -> dict:
    return {
        "id": None,
        "condition": "test",
        "kind": rules.TEST,
        "message": "This is a test alert from keyrotor: the webhook works.",
        "details": {},
        "raised_at": now,
    }


class Alerting:
    """The UI process's alert checks (one thread) and webhook sends (another)."""

    def __init__(self, db_path: Path, settings: AlertSettings, ui_url: str | None = None) -> None:
        self.db_path = db_path
        self.settings = settings
        self.ui_url = ui_url
        self._stop = threading.Event()
        self._outbox: queue.Queue[dict | None] = queue.Queue()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for target, name in ((self._check_loop, "keyrotor-alert-checks"), (self._send_loop, "keyrotor-alert-sends")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        self._outbox.put(None)
        for thread in self._threads:
            thread.join(timeout=2)

    def check_once(self, now: float | None = None) -> list[dict]:
        """Evaluate the conditions, record the changes, and queue the new alerts for the webhook."""
        now = time.time() if now is None else now
        conn = db.connect(self.db_path)
        try:
            opened = alerts.reconcile(conn, conditions(conn, self.settings, now), now)
        finally:
            conn.close()
        for alert in opened:
            log.warning("Alert: %s", alert["message"])
            if self.settings.webhook_url:
                self._outbox.put(alert)
        return opened

    def _check_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.check_once()
            except (sqlite3.Error, OSError) as e:
                log.warning("Alert checks failed this round: %s", e)
            self._stop.wait(self.settings.check_seconds)

    def _send_loop(self) -> None:
        while True:
            alert = self._outbox.get()
            if alert is None or self._stop.is_set():
                return
            self.send(alert)

    def send(self, alert: dict) -> Delivery:
        delivery = post_alert(
            self.settings.webhook_url,
            rules.webhook_body(alert, self.ui_url),
            self.settings.send_attempts,
            sleep=lambda s: self._stop.wait(s),
        )
        if alert.get("id") is not None:
            conn = db.connect(self.db_path)
            try:
                alerts.mark_sent(conn, alert["id"], time.time() if delivery.ok else None, delivery.error)
            finally:
                conn.close()
        return delivery

    def send_test(self) -> Delivery:
        """A test alert, sent now (the caller runs off the event loop), whatever holds."""
        if not self.settings.webhook_url:
            return Delivery(False, "no webhook: set [alerts] webhook_url", 0)
        body = rules.webhook_body(test_alert(time.time()), self.ui_url)
        return post_alert(self.settings.webhook_url, body, self.settings.send_attempts)
