"""Object ownership in storage: the first owner stays, new owners bump the revision, proxies read only new rows."""

from __future__ import annotations

from core.affinity import OwnedObject, Ownership
from storage import db, objects, schema


def test_owners_are_kept_read_incrementally_and_counted(database):
    conn = db.connect(database)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(schema.MIGRATIONS)
    with conn:
        objects.record_in_transaction(
            conn, [Ownership("flow-1", 1, (OwnedObject("file-1", "file"), OwnedObject("batch_1", "batch")))]
        )
    first = db.read_revision(conn, objects.OBJECTS)
    owners, last = objects.owners_since(conn, 0)
    assert owners == {"file-1": 1, "batch_1": 1}

    with conn:  # another key answering for the same file does not take it over
        objects.record_in_transaction(conn, [Ownership("flow-2", 2, (), ("file-1",), (OwnedObject("file-1", "file"),))])
    assert db.read_revision(conn, objects.OBJECTS) == first  # nothing new: proxies need not look
    assert objects.owners_since(conn, last) == ({}, last)
    with conn:
        objects.record_in_transaction(conn, [Ownership("flow-3", 2, (OwnedObject("resp_1", "response"),))])
    assert db.read_revision(conn, objects.OBJECTS) == first + 1
    assert objects.owners_since(conn, last)[0] == {"resp_1": 2}

    assert objects.counts_by_key(conn) == {1: 2, 2: 1}
    assert objects.objects_of_flow(conn, "flow-2") == [
        {"id": "file-1", "role": "used", "kind": "file", "owner_key_id": 1}
    ]
    conn.close()
