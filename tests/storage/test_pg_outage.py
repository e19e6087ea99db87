"""The capture writer while PostgreSQL is away: captures wait in memory up to capture.backlog_mb,
beyond it the oldest are dropped and counted; when the server returns, what waited is stored."""

from __future__ import annotations

from pathlib import Path

import pytest

from storage import capture_status, db, writer
from tests.conftest import wait_for
from tests.services import PostgresServer
from tests.storage.test_writer_thread import Row


@pytest.fixture
def on_postgres(tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("KEYROTOR_SECRET", raising=False)
    db.use_postgres(postgres_url)
    path = tmp_path / "kr.db"
    db.ensure_database(path)
    yield path
    db.use_postgres(None)


def stored(path: Path) -> list[str]:
    conn = db.connect(path)
    try:
        return [row[0] for row in conn.execute("SELECT flow_id FROM flows ORDER BY id")]
    finally:
        conn.close()


def test_while_postgresql_is_down_captures_wait_then_are_stored(on_postgres: Path, postgres_server: PostgresServer):
    shared = writer.acquire(on_postgres)
    try:
        shared.put(Row(0))
        wait_for(lambda: stored(on_postgres) == ["f0"], what="the first flow stored")
        postgres_server.stop()
        try:
            for n in range(1, 31):
                shared.put(Row(n))
            status = wait_for(
                lambda: (s := capture_status.read(on_postgres)).waiting == 30 and s, what="30 flows reported waiting"
            )
            assert status.failing_since is not None and status.dropped == 0
        finally:
            postgres_server.start()
        wait_for(lambda: capture_status.read(on_postgres).failing_since is None, timeout=20, what="capture resumed")
        wait_for(lambda: len(stored(on_postgres)) == 31, what="every waiting flow stored")
        assert stored(on_postgres) == [f"f{n}" for n in range(31)]
    finally:
        writer.release(shared)


def test_beyond_the_backlog_the_oldest_are_dropped_and_counted(on_postgres: Path, postgres_server: PostgresServer):
    shared = writer.acquire(on_postgres)
    shared.backlog_bytes = 10 * writer.ROW_OVERHEAD_BYTES  # room for ten small rows
    postgres_server.stop()
    try:
        for n in range(25):
            shared.put(Row(n))
        wait_for(lambda: capture_status.read(on_postgres).dropped == 15, what="15 flows counted as dropped")
    finally:
        postgres_server.start()
    writer.release(shared)
    assert stored(on_postgres) == [f"f{n}" for n in range(15, 25)]
    assert shared.rows_dropped == 15
