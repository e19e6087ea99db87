"""`run.py storage copy`: an SQLite database into PostgreSQL, interrupted and resumed, nothing decrypted."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from core.affinity import OwnedObject, Ownership
from storage import audit, client_keys, copy, db, flows, objects, pg, pg_schema, secrets, upstream_keys
from storage.flows import FlowFilter
from storage.upstream_keys import SqliteKeyStore
from tests.storage.test_packed_flows import make_records
from usecases.keys import add_keys

KEY = "sk-good-copy-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa0001"


class Interrupted(Exception):
    pass


@pytest.fixture
def source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An SQLite installation with keys, a client, flows (packed, with a trained dictionary), owners, audit."""
    monkeypatch.delenv("KEYROTOR_SECRET", raising=False)
    path = tmp_path / "kr.db"
    db.ensure_database(path)
    conn = db.connect(path)
    add_keys(SqliteKeyStore(conn, secrets.key_cipher(path)), [KEY])
    client_keys.create_client(conn, "alice")
    packer = flows.FlowPacker()
    records = make_records(700)
    for start in range(0, len(records), 100):
        with conn:
            flows.insert_batch(conn, records[start : start + 100], packer)
    with conn:
        objects.record_in_transaction(conn, [Ownership("f1", 1, created=(OwnedObject("file-1", "file"),), client_id=1)])
    with conn:
        audit.record(conn, "keys.add", "1", {"added": 1}, actor=audit.Actor(audit.CLI))
    conn.close()
    return path


def table_rows(conn, table: str, columns: list[str]) -> list[tuple]:
    names = ", ".join(f'"{c}"' for c in columns)
    return [tuple(r) for r in conn.execute(f'SELECT {names} FROM "{table}" ORDER BY {names}')]


def test_an_interrupted_copy_resumes_and_ends_with_every_row_keys_still_encrypted(
    source: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(copy, "FLOWS_CHUNK", 50)
    chunks = []

    def stop_after_three_flow_chunks(copied: copy.Copied) -> None:
        if copied.table == "flows":
            chunks.append(copied.rows)
            if len(chunks) == 3:
                raise Interrupted

    sqlite = db.connect_sqlite(source, readonly=True)
    target = pg.connect(postgres_url)
    with pytest.raises(Interrupted):
        copy.copy_database(sqlite, target, stop_after_three_flow_chunks)
    assert target.execute("SELECT count(*) FROM flows").fetchone()[0] == 150  # three chunks committed
    resumed: list[copy.Copied] = []
    copy.copy_database(sqlite, target, resumed.append)
    assert [c.rows for c in resumed if c.table == "flows"][-1] == 700 - 150  # went on; nothing twice

    for table in pg_schema.latest().tables:
        columns = [r[1] for r in sqlite.execute(f'PRAGMA table_info("{table}")')]
        assert table_rows(target, table, columns) == table_rows(sqlite, table, columns), table
    # Still encrypted, and with the installation's secret the key is the key.
    (stored,) = target.execute("SELECT secret FROM upstream_keys").fetchall()
    assert KEY.encode() not in stored[0]
    (key,) = upstream_keys.load_pool(target, secrets.key_cipher(source))
    assert key.value == KEY
    # Bodies read back unpacked, and search finds the same flows on both.
    assert flows.get_flow(target, 5) == flows.get_flow(sqlite, 5)
    for q in ("gpt-4o", "Rate limit", "4o-mini"):
        on_sqlite = [r["id"] for r in flows.search_flows(sqlite, FlowFilter(q=q), limit=1000)]
        assert on_sqlite and [r["id"] for r in flows.search_flows(target, FlowFilter(q=q), limit=1000)] == on_sqlite
    # New rows take ids after the copied ones.
    with target:
        flows.insert_batch(target, make_records(1, seed=9))
    assert target.execute("SELECT max(id) FROM flows").fetchone()[0] == 701
    sqlite.close()
    target.close()


def test_a_database_in_use_is_not_copied_into(source: Path, postgres_url: str):
    target = pg.connect(postgres_url)
    db.ensure_database(postgres_url)
    with target:
        flows.insert_batch(target, make_records(1, seed=9))
    with pytest.raises(copy.CopyRefused, match="already holds flows"):
        copy.copy_database(sqlite3.connect(source), target)
    target.close()
