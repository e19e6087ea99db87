"""Attempts by outcome, retries and refusals: counted as flows are written, and for flows stored before."""

from __future__ import annotations

import pytest

from core.records import AttemptLog, FlowRecord
from storage import db, flows, outcomes, rollups, schema
from tests.conftest import insert_into_old_schema

T0 = 1_800_000_000.0


def refused(code: str) -> list[list[str]]:
    return [["content-type", "application/json"], ["x-keyrotor-error", code]]


def row(n: int, **overrides) -> FlowRecord:
    base = {
        "flow_id": f"f{n}",
        "started_at": T0 + n * 600,
        "method": "POST",
        "path": "/v1/chat/completions",
        "status": 200,
        "upstream_key_id": 1,
        "attempts": 1,
        "response_headers": [["content-type", "application/json"]],
    }
    return FlowRecord(**(base | overrides))


def attempt(n: int, key: int, status: int | None) -> AttemptLog:
    return AttemptLog(
        attempt=n, key_id=key, status=status, error=None if status else "timeout", started_at=T0 + n, duration_ms=5.0
    )


ROWS = [
    row(1),  # one attempt, answered
    row(2, attempts=3, attempt_log=[attempt(1, 1, 429), attempt(2, 2, None), attempt(3, 3, 200)]),
    row(3, status=401, upstream_key_id=None, attempts=0, response_headers=refused("missing_api_key")),
    row(4, status=401, upstream_key_id=None, attempts=0, response_headers=refused("invalid_api_key")),
    row(5, status=503, upstream_key_id=None, attempts=0, response_headers=refused("no_upstream_key_available")),
    row(6, status=503, response_headers=refused("no_upstream_key_available")),  # one key, it said 401
    row(7, status=400),  # the request's own fault, passed through
    row(8, status=None, error="connection refused"),
    row(9, status=502, attempts=2, attempt_log=[attempt(1, 1, 500), attempt(2, 2, 502)]),
]
EXPECTED = {
    outcomes.ATTEMPT: {
        "success": 2,
        "rate_limited": 1,
        "no_response": 2,
        "key_failure": 1,
        "client_error": 1,
        "server_error": 2,
    },
    outcomes.RETRY: {"": 3},
    outcomes.REFUSAL: {"missing_api_key": 1, "invalid_api_key": 1, "no_upstream_key_available": 2},
}


def test_the_writer_path_counts_attempts_retries_and_refusals(conn):
    with conn:
        flows.insert_batch(conn, ROWS[:4])
        outcomes.add_records(conn, ROWS[:4])
    with conn:  # a second batch adds to the same hours
        flows.insert_batch(conn, ROWS[4:])
        outcomes.add_records(conn, ROWS[4:])
    assert outcomes.totals(conn) == EXPECTED


def test_these_rows_stay_out_of_the_dashboards_figures(conn):
    with conn:
        flows.insert_batch(conn, ROWS)
        rollups.add_records(conn, ROWS)
        outcomes.add_records(conn, ROWS)
    assert rollups.totals(conn, "hour", None).requests == len(ROWS)
    assert {v for v, _ in rollups.breakdown(conn, None, "upstream_key_id", None)} == {1, None}


def test_flows_stored_before_the_counters_are_counted_by_the_migration(tmp_path, monkeypatch):
    monkeypatch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:5])  # a v5 database
    path = tmp_path / "old.db"
    db.ensure_database(path)
    conn = db.connect(path)
    with conn:
        insert_into_old_schema(conn, ROWS)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 5
    monkeypatch.undo()
    schema.migrate(conn)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(schema.MIGRATIONS)
    assert outcomes.totals(conn) == EXPECTED
    conn.close()


@pytest.mark.parametrize(
    "headers, reason",
    [
        ([], None),
        ([["X-Keyrotor-Error", "missing_api_key"]], "missing_api_key"),
        ([["x-keyrotor-error", ""]], None),
        ([["x-upstream-note", "x-keyrotor-error"]], None),
    ],
)
def test_refusal_reason_comes_only_from_keyrotors_own_header(headers, reason):
    assert outcomes.refusal_reason(row(1, response_headers=headers)) == reason
