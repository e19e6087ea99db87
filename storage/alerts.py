"""Alerts: one row per time a condition held, open until it clears (core/alerts.py decides the conditions).

The UI process owns them (monitor_ui/alerting.py): it evaluates the conditions from storage,
and `reconcile` opens a row for each new condition and closes the rows of conditions that
cleared, in one write transaction. A unique index on the open rows' condition makes
"once per condition" hold even if two processes raced: the second insert is ignored,
and only the process whose insert took place sends the alert.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable

from core.alerts import Condition

OPEN_LIMIT = 100


def reconcile(conn: sqlite3.Connection, conditions: Iterable[Condition], now: float) -> list[dict]:
    """Open an alert for each condition without one, clear the open ones no longer among `conditions`.

    Returns the alerts opened now (to send), as open_alerts shapes them.
    """
    holding = {c.key: c for c in conditions}
    opened = []
    if set(holding) == {row[0] for row in conn.execute("SELECT condition FROM alerts WHERE cleared_at IS NULL")}:
        return []  # nothing changed: no write lock taken from the proxy's writer
    with conn:
        conn.execute("BEGIN IMMEDIATE")
        open_now = {row[0]: row[1] for row in conn.execute("SELECT condition, id FROM alerts WHERE cleared_at IS NULL")}
        cleared = [alert_id for key, alert_id in open_now.items() if key not in holding]
        conn.executemany("UPDATE alerts SET cleared_at = ? WHERE id = ?", [(now, i) for i in cleared])
        for key, condition in holding.items():
            if key in open_now:
                continue
            cursor = conn.execute(
                "INSERT OR IGNORE INTO alerts (condition, kind, message, details, raised_at) VALUES (?, ?, ?, ?, ?)",
                (key, condition.kind, condition.message, json.dumps(condition.details), now),
            )
            if cursor.rowcount:
                opened.append(cursor.lastrowid)
    if not opened:
        return []
    return [_shaped(row) for row in _rows(conn, f"WHERE id IN ({','.join('?' * len(opened))})", opened)]


def mark_sent(conn: sqlite3.Connection, alert_id: int, sent_at: float | None, error: str | None) -> None:
    with conn:
        conn.execute("UPDATE alerts SET sent_at = ?, send_error = ? WHERE id = ?", (sent_at, error, alert_id))


def _rows(conn: sqlite3.Connection, where: str, params: Iterable = ()) -> list[sqlite3.Row]:
    return conn.execute(
        "SELECT id, condition, kind, message, details, raised_at, cleared_at, sent_at, send_error FROM alerts " + where,
        list(params),
    ).fetchall()


def _shaped(row: sqlite3.Row) -> dict:
    shaped = dict(row)
    shaped["details"] = json.loads(row["details"] or "{}")
    return shaped


def open_alerts(conn: sqlite3.Connection, limit: int = OPEN_LIMIT) -> list[dict]:
    """The conditions that hold now, newest first."""
    try:
        rows = _rows(conn, "WHERE cleared_at IS NULL ORDER BY raised_at DESC, id DESC LIMIT ?", (limit,))
    except sqlite3.OperationalError:  # a database before alerts (the UI reading while the proxy migrates)
        return []
    return [_shaped(r) for r in rows]


def recent_alerts(conn: sqlite3.Connection, limit: int = 50) -> list[dict]:
    """Every alert, open or cleared, newest first."""
    return [_shaped(r) for r in _rows(conn, "ORDER BY id DESC LIMIT ?", (limit,))]
