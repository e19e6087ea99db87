"""Upgrading a database in place (the writer between batches, `run.py storage migrate`), size
retention, `run.py storage stats` and the capture.max_gb setting."""

from __future__ import annotations

from dataclasses import replace

import openai
import pytest

from config import ConfigError, load_settings
from core.records import FlowRecord
from storage import conversion, db, flows, writer
from storage.flows import FlowFilter
from tests.conftest import Keyrotor, stored_flows, wait_for
from tests.storage.test_packed_flows import as_captured, make_records, old_database


class Captured:
    def __init__(self, record: FlowRecord) -> None:
        self.record = record

    def to_record(self) -> FlowRecord:
        return self.record


def read(path, fn):
    conn = db.connect(path, readonly=True)
    try:
        return fn(conn)
    finally:
        conn.close()


def test_the_writer_converts_an_old_database_between_batches_and_captures_meanwhile(tmp_path, monkeypatch):
    path = tmp_path / "old.db"
    old_database(path).close()
    db.ensure_database(path)  # what the proxy does at start: the schema is new, the rows are not
    assert read(path, lambda c: conversion.progress(c).remaining) == 300
    monkeypatch.setattr(conversion, "CHUNK", 20)  # many chunks, capture batches between them
    w = writer.acquire(path)
    try:
        new = [replace(r, flow_id="new-" + r.flow_id) for r in make_records(50, seed=11)]
        for record in new:
            w.put(Captured(record))
        wait_for(lambda: not read(path, conversion.pending), timeout=30, what="every old flow converted")
        wait_for(lambda: read(path, flows.count_flows) == 350, what="the new flows written")
    finally:
        writer.release(w)
    rows = stored_flows(path)
    assert read(path, lambda c: c.execute("SELECT count(*) FROM flows WHERE content IS NULL").fetchone()[0]) == 0
    old = make_records(300, seed=5)
    by_flow = {r["flow_id"]: r for r in rows}
    for record in old + new:
        row = by_flow[record.flow_id]
        assert {name: row[name] for name in flows.PACKED_COLUMNS} == as_captured(record)
    hits = read(path, lambda c: flows.search_flows(c, FlowFilter(q="gpt-4o alpha"), 1000))
    expected = [r["id"] for r in reversed(rows) if "alpha" in (r["request_body"] or "") + (r["response_body"] or "")]
    assert {r["id"] for r in hits} <= set(expected) and hits


def test_size_retention_purges_the_oldest_flows_first(database):
    records = make_records(600, seed=2)
    conn = db.connect(database)
    with conn:
        flows.insert_batch(conn, records)
    used = flows.used_bytes(conn)
    oldest = flows.size_surplus(conn, used // 2)
    assert 200 < oldest < 400  # about half the rows, at the average row's size
    while deleted := flows.purge_chunk(conn, None, None, oldest):
        oldest -= deleted
    kept = [r["flow_id"] for r in flows.recent_flows(conn, 500)]
    assert 200 < len(kept) < 400
    assert kept == [r.flow_id for r in reversed(records)][: len(kept)]  # the newest stay
    assert flows.used_bytes(conn) < used * 0.85  # fixed costs (other tables, index structure) stay
    assert flows.size_surplus(conn, used * 2) == 0
    conn.close()


def test_the_writer_applies_max_bytes(database):
    conn = db.connect(database)
    with conn:
        flows.insert_batch(conn, make_records(100, seed=2))
    conn.close()
    w = writer.acquire(database)
    try:
        w.retention = writer.Retention(max_bytes=1)  # nothing fits
        w._next_purge = 0  # due now
        w.put(Captured(make_records(1, seed=4)[0]))
        wait_for(lambda: read(database, flows.count_flows) <= 1, what="the flows purged for size")
    finally:
        writer.release(w)


def test_storage_migrate_and_stats_from_the_command_line(keyrotor: Keyrotor):
    old_database(keyrotor.db_path).close()
    stats = keyrotor.cli("storage", "stats").stdout
    assert "flows            300" in stats and "not converted    300" in stats
    migrated = keyrotor.cli("storage", "migrate").stdout
    assert "300 flows converted" in migrated
    stats = keyrotor.cli("storage", "stats").stdout
    assert "not converted" not in stats and "bytes per flow   rows" in stats and "retention" in stats
    assert "keep_days binds" in stats or "keeps" in stats
    keyrotor.cli("storage", "migrate")  # nothing left: a second run is harmless
    assert len(stored_flows(keyrotor.db_path)) == 300


def test_a_proxy_on_an_old_database_captures_and_converts(keyrotor: Keyrotor):
    old_database(keyrotor.db_path).close()
    client_key = keyrotor.start_serving("sk-good-upgrade-aaaaaaaaaaaaaaaaaaaaa-0001")
    client = openai.OpenAI(base_url=keyrotor.base_url, api_key=client_key, max_retries=0, timeout=20)
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hello upgrade"}])
    wait_for(lambda: not read(keyrotor.db_path, conversion.pending), timeout=30, what="old flows converted")
    wait_for(lambda: len(stored_flows(keyrotor.db_path)) == 301, what="the new flow stored")
    found = read(keyrotor.db_path, lambda c: flows.search_flows(c, FlowFilter(q="upgrade"), 10, columns="*"))
    assert len(found) == 1 and "hello upgrade" in found[0]["request_body"]


@pytest.mark.parametrize("value", ["-1", "lots", "nan", "inf"])
def test_max_gb_must_be_a_number_zero_or_more(value):
    with pytest.raises(ConfigError, match="capture.max_gb"):
        load_settings(environ={"KEYROTOR_CAPTURE_MAX_GB": value})


def test_max_gb_takes_decimals():
    assert load_settings(environ={"KEYROTOR_CAPTURE_MAX_GB": "0.5"})["capture.max_gb"] == 0.5
