"""Object ownership in storage: the first owner stays, new owners bump the revision, proxies read only new rows."""

from __future__ import annotations

from core.affinity import OwnedObject, Ownership
from storage import client_keys, db, objects, schema


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
        {"id": "file-1", "role": "used", "kind": "file", "owner_key_id": 1, "client_id": None, "client_name": None}
    ]
    conn.close()


def test_objects_keep_the_client_that_made_them(database):
    conn = db.connect(database)
    client_keys.create_client(conn, "alice")
    alice = client_keys.client_row(conn, "alice")["id"]
    made = Ownership(
        "flow-1",
        1,
        (OwnedObject("file-a", "file"),),
        ("file-old",),
        (OwnedObject("file-old", "file"),),
        client_id=alice,
        claimed=frozenset({"file-a"}),
    )
    with conn:
        objects.record_in_transaction(conn, [made])
    assert objects.clients_since(conn, 0) == {"file-a": alice}  # file-old was made before: nobody's
    assert objects.counts_by_client(conn) == {None: 1, alice: 1}
    assert [o["id"] for o in objects.objects_of_client(conn, alice)] == ["file-a"]
    shown = {o["id"]: (o["client_id"], o["client_name"]) for o in objects.objects_of_flow(conn, "flow-1")}
    assert shown == {"file-a": (alice, "alice"), "file-old": (None, None)}
    conn.close()
