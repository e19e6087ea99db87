"""Upstream attempts by outcome, retries, and keyrotor's own refusals, counted per hour for /metrics.

The capture writer folds each batch in beside the rollups (same transaction), into the hour
rollup table under dimensions of their own, with the count in `requests`: /metrics then reads
a few rows per hour instead of scanning flows. Rollup readers select their dimensions by name,
so these rows never mix into the dashboard's figures.
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from collections.abc import Iterable
from typing import Any

from storage import rollups

ATTEMPT, RETRY, REFUSAL = "attempt", "retry", "refusal"
DIMENSIONS = (ATTEMPT, RETRY, REFUSAL)
# One attempt, then keyrotor's 503: upstream answered 401, 403 or 429, but the row keeps only the 503.
KEY_FAILURE = "key_failure"
OUTCOMES = ("success", "client_error", "key_rejected", "rate_limited", "server_error", "no_response", KEY_FAILURE)
REFUSAL_HEADER = "x-keyrotor-error"  # set on every answer keyrotor makes itself (addons/errors.py)


def attempt_outcome(status: int | None) -> str:
    if status is None:
        return "no_response"
    if status < 400:
        return "success"
    if status in (401, 403):
        return "key_rejected"
    if status == 429:
        return "rate_limited"
    return "server_error" if status >= 500 else "client_error"


def refusal_reason(row: dict[str, Any]) -> str | None:
    """The code keyrotor answered with itself (missing_api_key, no_upstream_key_available, …), if it did."""
    headers = row.get("response_headers")
    if not headers or REFUSAL_HEADER not in headers.lower():  # a substring test first: most rows have none
        return None
    try:
        fields = json.loads(headers)
    except ValueError:
        return None
    return next((str(v) for k, v in fields if str(k).lower() == REFUSAL_HEADER and v), None)


def counts(rows: Iterable[dict[str, Any]]) -> Counter:
    """(dimension, hour bucket, value) → count, for a batch of flow rows as the writer has them."""
    hour = rollups.GRAINS["hour"]
    found: Counter = Counter()
    for row in rows:
        bucket = int(row["started_at"] // hour) * hour
        reason = refusal_reason(row)
        if reason:
            found[(REFUSAL, bucket, reason)] += 1
        attempts = row.get("attempt_rows") or ()
        if attempts:
            outcomes = [attempt_outcome(a.get("status")) for a in attempts]
        elif row.get("upstream_key_id") is not None and row.get("attempts"):
            refused_after = reason == "no_upstream_key_available"
            outcomes = [KEY_FAILURE if refused_after else attempt_outcome(row.get("status"))]
        else:
            outcomes = []  # answered by keyrotor before any upstream attempt
        for outcome in outcomes:
            found[(ATTEMPT, bucket, outcome)] += 1
        if len(outcomes) > 1:
            found[(RETRY, bucket, "")] += len(outcomes) - 1
    return found


_UPSERT = (
    f"INSERT INTO {rollups.table_of('hour')} (dimension, bucket, value, requests) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (dimension, bucket, value) DO UPDATE SET requests = requests + excluded.requests"
)


def add_rows(conn: sqlite3.Connection, rows: list[dict[str, Any]]) -> None:
    """Fold a batch of new flow rows in, in the caller's transaction."""
    found = counts(rows)
    if found:
        conn.executemany(_UPSERT, [(*key, n) for key, n in found.items()])


def totals(conn: sqlite3.Connection) -> dict[str, dict[str, int]]:
    """All time: dimension → value → count."""
    result: dict[str, dict[str, int]] = {d: {} for d in DIMENSIONS}
    for dimension in DIMENSIONS:
        for value, count in conn.execute(
            f"SELECT value, sum(requests) FROM {rollups.table_of('hour')} WHERE dimension = ? GROUP BY value",
            (dimension,),
        ):
            result[dimension][value] = count
    return result


def backfill(conn: sqlite3.Connection) -> None:
    """Count the flows stored before these counters existed, in slices (for the migration)."""
    last = 0
    while True:
        cursor = conn.execute(
            "SELECT id, flow_id, started_at, status, attempts, upstream_key_id,"
            " CASE WHEN instr(lower(response_headers), ?) THEN response_headers END AS response_headers"
            " FROM flows WHERE id > ? ORDER BY id LIMIT 20000",
            (REFUSAL_HEADER, last),
        )
        names = [column[0] for column in cursor.description]
        rows = [dict(zip(names, r, strict=True)) for r in cursor]
        if not rows:
            return
        retried = [r["flow_id"] for r in rows if (r["attempts"] or 0) > 1]
        attempts: dict[str, list[dict]] = {}
        for start in range(0, len(retried), 500):
            chunk = retried[start : start + 500]
            for flow_id, status in conn.execute(
                f"SELECT flow_id, status FROM attempts WHERE flow_id IN ({','.join('?' * len(chunk))})"
                " ORDER BY flow_id, attempt",
                chunk,
            ):
                attempts.setdefault(flow_id, []).append({"status": status})
        for row in rows:
            row["attempt_rows"] = attempts.get(row["flow_id"], ())
        found = counts(rows)
        conn.executemany(_UPSERT, [(*key, n) for key, n in found.items()])
        last = rows[-1]["id"]
