"""Content-addressed parts of flows: each repeated text stored once, compressed, with a count of users.

A blob is added with the batch of flows that use it (its count goes up by as many) and
goes away in the purge that removes the last flow using it (storage/flows.py).
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Iterable

from storage import packing
from storage.sql import insert_many

_UPSERT_HEAD = "INSERT INTO blobs (digest, data, size, refs)"
_UPSERT_TAIL = "ON CONFLICT (digest) DO UPDATE SET refs = refs + excluded.refs RETURNING id, digest"


class BlobWriter:
    """The writer thread's side: compresses a part once, however many flows repeat it."""

    CACHE = 4096  # recent parts' compressed bytes, so a repeated prompt is not compressed again

    def __init__(self) -> None:
        self._compressed: dict[bytes, bytes] = {}

    def add(self, conn: sqlite3.Connection, parts: Iterable[packing.Part], dictionary_id: int) -> dict[bytes, int]:
        """Count one more use of each part (in the caller's transaction); returns blob ids by digest."""
        uses: Counter[bytes] = Counter()
        texts: dict[bytes, str] = {}
        for part in parts:
            uses[part.digest] += 1
            texts[part.digest] = part.text
        rows = []
        for digest, count in uses.items():
            data = self._compressed.get(digest)
            if data is None:
                data = packing.CODEC.compress(texts[digest].encode(), dictionary_id)
                if len(self._compressed) >= self.CACHE:
                    self._compressed.pop(next(iter(self._compressed)))
                self._compressed[digest] = data
            rows.append((digest, data, len(texts[digest].encode()), count))
        ids: dict[bytes, int] = {}
        for start in range(0, len(rows), 100):
            chunk = rows[start : start + 100]
            statement = f"{_UPSERT_HEAD} VALUES {', '.join(['(?, ?, ?, ?)'] * len(chunk))} {_UPSERT_TAIL}"
            ids.update((digest, blob_id) for blob_id, digest in conn.execute(statement, [v for r in chunk for v in r]))
        return ids


def release(conn: sqlite3.Connection, blob_ids: Iterable[int]) -> None:
    """One use fewer of each id listed (an id once per use); blobs nobody uses any more are deleted."""
    uses = Counter(blob_ids)
    if not uses:
        return
    insert_many(
        conn,
        "WITH released (id, n) AS (",
        list(uses.items()),
        ") UPDATE blobs SET refs = refs - released.n FROM released WHERE blobs.id = released.id",
    )
    ids = list(uses)
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        conn.execute(f"DELETE FROM blobs WHERE refs <= 0 AND id IN ({', '.join('?' * len(chunk))})", chunk)


def texts_of(conn: sqlite3.Connection, blob_ids: Iterable[int], known: dict[int, str] | None = None) -> dict[int, str]:
    """The parts' texts by id; `known` (already read) is reused and filled."""
    texts = {} if known is None else known
    wanted = sorted(set(blob_ids) - texts.keys())
    for start in range(0, len(wanted), 500):
        chunk = wanted[start : start + 500]
        for blob_id, data in conn.execute(
            f"SELECT id, data FROM blobs WHERE id IN ({', '.join('?' * len(chunk))})", chunk
        ):
            texts[blob_id] = packing.CODEC.decompress(conn, data).decode()
    return texts
