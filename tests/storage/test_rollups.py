"""Rollups: what the dashboard reads instead of the flows table."""

from __future__ import annotations

import pytest

from core.records import FlowRecord
from storage import db, flows, rollups, schema
from tests.conftest import insert_into_old_schema

T0 = 1_800_000_000.0  # a whole hour
ALL_MIGRATIONS = list(schema.MIGRATIONS)


def row(n: int, **overrides) -> FlowRecord:
    base = {
        "flow_id": f"f{n}",
        "started_at": T0 + n,
        "method": "POST",
        "path": "/v1/chat/completions",
        "status": 200,
        "model": "gpt-4o-mini",
        "stream": 0,
        "duration_ms": 40.0,
        "upstream_key_id": 1,
        "client_key_id": 2,
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "cost": 0.001,
    }
    return FlowRecord(**(base | overrides))


def write(conn, rows):
    with conn:
        flows.insert_batch(conn, rows)
        rollups.add_records(conn, rows)


def test_totals_add_up_across_batches_and_grains(conn):
    write(conn, [row(1), row(2, status=429), row(3, status=None, error="server closed connection")])
    write(conn, [row(70, model="gpt-4o", stream=1, first_byte_at=T0 + 70.12, duration_ms=900.0)])
    for grain in rollups.GRAINS:
        totals = rollups.totals(conn, grain, None)
        assert (totals.requests, totals.errors, totals.streamed) == (4, 2, 1)
        assert (totals.prompt_tokens, totals.completion_tokens) == (40, 20)
        assert totals.cost == pytest.approx(0.004)
        assert totals.success_rate == 0.5
        assert totals.latency_ms(50) == 50 and totals.latency_ms(95) == 1000
        assert totals.first_byte_ms(50) == 150
    assert rollups.totals(conn, "minute", T0 + 60).requests == 1  # the second minute only


def test_breakdowns_and_series(conn):
    write(conn, [row(1), row(2, model="gpt-4o"), row(3, model="gpt-4o", upstream_key_id=7), row(65)])
    by_model = {m: t.requests for m, t in rollups.breakdown(conn, None, "model")}
    assert by_model == {"gpt-4o": 2, "gpt-4o-mini": 2}
    assert [(k, t.requests) for k, t in rollups.breakdown(conn, None, "upstream_key_id")] == [(1, 3), (7, 1)]
    assert [(k, t.requests) for k, t in rollups.breakdown(conn, T0 + 3600, "client_key_id")] == []
    assert rollups.series(conn, "minute", T0) == [(int(T0), 3, 0), (int(T0) + 60, 1, 0)]
    with pytest.raises(ValueError):
        rollups.breakdown(conn, None, "path; DROP TABLE flows")


@pytest.mark.parametrize("ms, index", [(0, 0), (5, 0), (5.1, 1), (120_000, 23), (10**9, 24)])
def test_bucket_index(ms, index):
    assert rollups.bucket_index(ms) == index


def test_old_minutes_are_dropped_hours_stay(conn):
    write(conn, [row(1)])
    rollups.drop_old_minutes(conn, T0 + rollups.KEEP_MINUTES_SECONDS + 120)
    assert rollups.totals(conn, "minute", None).requests == 0
    assert rollups.totals(conn, "hour", None).requests == 1


def test_a_v3_database_keeps_its_figures_in_the_v4_layout(tmp_path, monkeypatch):
    # v2 flows, folded into v3's (bucket, model, key, client) rollups, then converted by v4.
    rows = [
        row(1),
        row(2, model="gpt-4o", status=500),
        row(3, model=None, upstream_key_id=None, client_key_id=None),
        row(3700, stream=1, first_byte_at=T0 + 3700.02, duration_ms=700.0),
    ]
    old = db.connect(tmp_path / "old.db")
    monkeypatch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:2])
    schema.migrate(old)
    with old:
        insert_into_old_schema(old, rows)
    monkeypatch.setattr(schema, "MIGRATIONS", ALL_MIGRATIONS)
    schema.migrate(old)
    assert old.execute("PRAGMA user_version").fetchone()[0] == len(ALL_MIGRATIONS)
    new = db.connect(tmp_path / "new.db")
    schema.migrate(new)
    write(new, rows)
    for conn in (old, new):
        assert rollups.totals(conn, "hour", None) == rollups.totals(new, "hour", None)
        assert rollups.totals(conn, "minute", T0).requests == 4
        for dimension in ("model", "upstream_key_id", "client_key_id"):  # what v3 kept
            assert rollups.breakdown(conn, None, dimension) == rollups.breakdown(new, None, dimension)
        assert rollups.series(conn, "hour", T0) == [(int(T0), 3, 1), (int(T0) + 3600, 1, 0)]
    assert dict((k, t.requests) for k, t in rollups.breakdown(old, None, "upstream_key_id")) == {1: 3, None: 1}
    # Upstreams and groups came later: flows converted from v3 have no rows for them.
    assert rollups.breakdown(old, None, "upstream_id") == rollups.breakdown(old, None, "group_id") == []
