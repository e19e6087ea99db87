"""Upstream keys at rest: encrypted, de-duplicated, reported line by line."""

from __future__ import annotations

import pytest

from storage import db, secrets, upstream_keys
from storage.secrets import KeyCipher
from storage.upstream_keys import SqliteKeyStore
from usecases.keys import add_keys

GOOD = "sk-proj-" + "a" * 40 + "WXYZ"


@pytest.fixture
def store(database):
    conn = db.connect(database)
    yield database, conn, secrets.key_cipher(database)
    conn.close()


def test_add_reports_added_duplicates_and_malformed_lines(store):
    _, conn, cipher = store
    lines = [GOOD, "", "# a comment", GOOD, "not a key", "sk-short", "Bearer sk-" + "b" * 40, "sk-ü" + "c" * 30]
    report = add_keys(SqliteKeyStore(conn, cipher), lines)
    assert (len(report.added), report.duplicates, report.malformed) == (2, 1, [5, 6, 8])
    again = add_keys(SqliteKeyStore(conn, cipher), [GOOD])
    assert (again.added, again.duplicates) == ([], 1)


def test_values_exist_only_encrypted(store, sqlite_only):
    path, conn, cipher = store
    add_keys(SqliteKeyStore(conn, cipher), [GOOD])
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert GOOD.encode() not in path.read_bytes()
    (row,) = upstream_keys.list_keys(conn)
    assert row["last4"] == "WXYZ" and "secret" not in row.keys()
    (key,) = upstream_keys.load_pool(conn, cipher)
    assert key.value == GOOD and key.state == "active"


def test_keys_encrypted_with_another_secret_are_not_loaded(store):
    _, conn, cipher = store
    add_keys(SqliteKeyStore(conn, cipher), [GOOD])
    other = KeyCipher(secrets.Fernet.generate_key())
    assert upstream_keys.load_pool(conn, other) == []


def test_admin_changes_bump_the_revision_the_proxy_polls(store):
    _, conn, cipher = store
    before = db.read_revision(conn, "keys")
    report = add_keys(SqliteKeyStore(conn, cipher), [GOOD])
    upstream_keys.set_admin_state(conn, report.added, "disabled", "test")
    upstream_keys.delete_keys(conn, report.added)
    assert db.read_revision(conn, "keys") == before + 3


def test_learnt_states_do_not_override_an_admin_disable(store):
    _, conn, cipher = store
    (key_id,) = add_keys(SqliteKeyStore(conn, cipher), [GOOD]).added
    upstream_keys.set_admin_state(conn, [key_id], "disabled", "disabled by admin")
    with conn:
        upstream_keys.record_state(conn, key_id, "invalid", "401", None, 1.0)
    assert upstream_keys.list_keys(conn)[0]["state"] == "disabled"


def test_keys_take_names_from_tab_lines_or_a_default_and_are_renamed(store):
    _, conn, cipher = store
    other = "sk-" + "d" * 40
    lines = [f"Key 1\t{GOOD}", f"  \t{other}", "bad\tname\tsk-" + "e" * 40, "sk-" + "f" * 40]
    report = add_keys(SqliteKeyStore(conn, cipher), lines, name="team-a")
    assert report.malformed == [3]  # a tab inside the name: the line is not NAME<TAB>KEY
    assert [(r["name"], r["last4"]) for r in upstream_keys.list_keys(conn)] == [
        ("Key 1", "WXYZ"),
        ("team-a", "dddd"),
        ("team-a", "ffff"),
    ]
    assert add_keys(SqliteKeyStore(conn, cipher), [f"Other\t{GOOD}"]).duplicates == 1  # keeps its name
    assert upstream_keys.get_key(conn, 1)["name"] == "Key 1"
    assert upstream_keys.rename_key(conn, 1, "  Prod key  ") == 1
    assert upstream_keys.labels_of(conn, [1, 2, 99]) == {1: ("Prod key", "WXYZ"), 2: ("team-a", "dddd")}
    assert upstream_keys.rename_key(conn, 2, "") == 1 and upstream_keys.get_key(conn, 2)["name"] is None
    assert upstream_keys.rename_key(conn, 99, "x") == 0
    with pytest.raises(ValueError, match="at most 64"):
        upstream_keys.rename_key(conn, 1, "x" * 65)
    # A name is a label for people: the value never shows through it and it never holds one.
    assert GOOD not in repr(upstream_keys.labels_of(conn, [1]))
