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

from core.records import AttemptLog, FlowRecord
from storage import rollups
from storage.sql import insert_many

ATTEMPT, RETRY, REFUSAL = "attempt", "retry", "refusal"
DIMENSIONS = (ATTEMPT, RETRY, REFUSAL)
# One attempt, then keyrotor's 503: upstream answered 401, 403 or 429, but the row keeps only the 503.
KEY_FAILURE = "key_failure"
OUTCOMES = ("success", "client_error", "key_rejected", "rate_limited", "server_error", "no_response", KEY_FAILURE)
REFUSAL_HEADER = "x-keyrotor-error"  # set on every answer keyrotor makes itself (core/errors.py)


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


def refusal_reason(record: FlowRecord) -> str | None:
    """The code keyrotor answered with itself (missing_api_key, no_upstream_key_available, …), if it did."""
    return next((str(v) for k, v in record.response_headers if str(k).lower() == REFUSAL_HEADER and v), None)


def counts(records: Iterable[FlowRecord]) -> Counter:
    """(dimension, hour bucket, value) → count, for a batch of flows as the writer has them."""
    hour = rollups.GRAINS["hour"]
    found: Counter = Counter()
    for record in records:
        bucket = int(record.started_at // hour) * hour
        reason = refusal_reason(record)
        if reason:
            found[(REFUSAL, bucket, reason)] += 1
        if record.attempt_log:
            outcomes = [attempt_outcome(a.status) for a in record.attempt_log]
        elif record.upstream_key_id is not None and record.attempts:
            refused_after = reason == "no_upstream_key_available"
            outcomes = [KEY_FAILURE if refused_after else attempt_outcome(record.status)]
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
_UPSERT_HEAD = f"INSERT INTO {rollups.table_of('hour')} (dimension, bucket, value, requests)"
_UPSERT_TAIL = "ON CONFLICT (dimension, bucket, value) DO UPDATE SET requests = requests + excluded.requests"


def add_records(conn: sqlite3.Connection, records: list[FlowRecord]) -> None:
    """Fold a batch of new flows in, in the caller's transaction."""
    found = counts(records)
    if found:  # one statement per batch: the writer gives up the GIL around each (storage.sql.insert_many)
        insert_many(conn, _UPSERT_HEAD, [(*key, n) for key, n in found.items()], _UPSERT_TAIL)


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


def refusals_since(conn: sqlite3.Connection, since: int | None) -> dict[str, int]:
    """Requests keyrotor answered itself, by reason, since an hour bucket; most frequent first."""
    rows = conn.execute(
        f"SELECT value, sum(requests) AS n FROM {rollups.table_of('hour')} WHERE dimension = ? AND bucket >= ?"
        " GROUP BY value ORDER BY n DESC, value LIMIT 100",
        (REFUSAL, since or 0),
    )
    return {value: n for value, n in rows}


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
        attempts: dict[str, list[AttemptLog]] = {}
        for start in range(0, len(retried), 500):
            chunk = retried[start : start + 500]
            for flow_id, status in conn.execute(
                f"SELECT flow_id, status FROM attempts WHERE flow_id IN ({','.join('?' * len(chunk))})"
                " ORDER BY flow_id, attempt",
                chunk,
            ):
                log = attempts.setdefault(flow_id, [])
                log.append(AttemptLog(attempt=len(log) + 1, key_id=0, started_at=0.0, status=status))
        records = [
            FlowRecord(
                flow_id=row["flow_id"],
                started_at=row["started_at"],
                method="",
                path="",
                status=row["status"],
                attempts=row["attempts"] or 0,
                upstream_key_id=row["upstream_key_id"],
                response_headers=json.loads(row["response_headers"]) if row["response_headers"] else [],
                attempt_log=attempts.get(row["flow_id"], []),
            )
            for row in rows
        ]
        found = counts(records)
        conn.executemany(_UPSERT, [(*key, n) for key, n in found.items()])
        last = rows[-1]["id"]
