"""The one writer thread: owns the proxy's write connection, inserts in batches.

Hooks on the event loop only put items on a queue. Turning a captured flow into a
record (decoding, JSON parsing, truncation) also happens here, off the loop: items
carry a `to_record()` method that this thread calls. It implements two of core's
ports: RecordSink (captured flows) and PoolStateSink (key states learnt upstream).
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from core.models import FetchedModels, KeyStateChange
from core.records import FlowRecord
from storage import db, flows, outcomes, rollups, routes, upstream_keys

log = logging.getLogger(__name__)

MAX_BATCH = 1000
GATHER_SECONDS = 0.2  # inside DESIGN's "flush at least every 250 ms"
WRITE_ATTEMPTS = 5
PURGE_SECONDS = 60.0  # how often retention is applied


@dataclass(frozen=True)
class Retention:
    keep_days: float = 0  # 0: no age limit
    max_rows: int = 0  # 0: no row limit


class Recordable(Protocol):
    """A captured flow (core.records.CapturedFlow), or anything else that makes a record."""

    def to_record(self) -> FlowRecord: ...


_STOP = object()


class Writer:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="keyrotor-writer", daemon=True)
        self._users = 0
        self.rows_written = 0
        self.rows_purged = 0
        self.retention = Retention()
        self._next_purge = time.monotonic()  # the first round runs at start-up

    def put(self, item: Recordable | KeyStateChange) -> None:
        self._queue.put(item)

    def record(self, flow: Recordable) -> None:
        self._queue.put(flow)

    def save_state(self, change: KeyStateChange) -> None:
        self._queue.put(change)

    def save_models(self, fetched: FetchedModels) -> None:
        self._queue.put(fetched)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Write everything still queued, then end the thread."""
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def _run(self) -> None:
        conn = db.connect(self.path)
        try:
            stopping = False
            while not stopping:
                # Block for the first item, then let more arrive for a moment: a commit per
                # row (and a thread switch per row) costs more than the row itself.
                try:
                    batch = [self._queue.get(timeout=max(0.01, self._next_purge - time.monotonic()))]
                except queue.Empty:
                    self._purge(conn)
                    continue
                if batch[0] is not _STOP:
                    time.sleep(GATHER_SECONDS)
                while len(batch) < MAX_BATCH:
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                if _STOP in batch:
                    stopping = True
                    batch = [item for item in batch if item is not _STOP]
                    batch += self._drain()
                self._write(conn, batch)
                if time.monotonic() >= self._next_purge:
                    self._purge(conn)
        finally:
            conn.close()

    def _purge(self, conn) -> None:
        """Apply retention a chunk at a time, yielding to capture whenever rows are waiting."""
        self._next_purge = time.monotonic() + PURGE_SECONDS
        keep = self.retention
        try:
            rollups.drop_old_minutes(conn, time.time())
            conn.commit()
            if not keep.keep_days and not keep.max_rows:
                return
            older_than = time.time() - keep.keep_days * 86400 if keep.keep_days else None
            while True:
                deleted = flows.purge_chunk(conn, older_than, keep.max_rows or None)
                self.rows_purged += deleted
                if deleted < flows.PURGE_CHUNK:
                    return
                if not self._queue.empty():
                    self._next_purge = time.monotonic()  # capture first; carry on after its batch
                    return
        except sqlite3.Error:
            log.exception("applying retention failed; trying again in %d s", PURGE_SECONDS)

    def _drain(self) -> list:
        items = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return items
            if item is not _STOP:
                items.append(item)

    def _write(self, conn, batch: list) -> None:
        rows: list[FlowRecord] = []
        states: list[KeyStateChange] = []
        fetched: list[FetchedModels] = []
        for item in batch:
            if isinstance(item, KeyStateChange):
                states.append(item)
                continue
            if isinstance(item, FetchedModels):
                fetched.append(item)
                continue
            try:
                rows.append(item.to_record())
            except Exception:
                log.exception("could not turn a captured flow into a record; it is skipped")
        for attempt in range(WRITE_ATTEMPTS):
            try:
                with conn:
                    flows.insert_batch(conn, rows)
                    rollups.add_records(conn, rows)
                    outcomes.add_records(conn, rows)
                    for change in states:
                        upstream_keys.record_state(
                            conn, change.key_id, change.state, change.reason, change.cooldown_until, change.at
                        )
                for models in fetched:  # rare, and idempotent: its own transaction, bumping the routes revision
                    routes.store_fetched_models(conn, models.group_id, models.models)
                self.rows_written += len(rows)
                return
            except sqlite3.OperationalError as e:
                # "database is locked" outlasting busy_timeout (a long admin transaction): wait, don't drop.
                log.warning("writing %d flows failed (%s); attempt %d of %d", len(rows), e, attempt + 1, WRITE_ATTEMPTS)
                time.sleep(0.2 * 2**attempt)
            except Exception:
                log.exception("writing a batch failed")
                break
        log.error("writing %d flows and %d key states failed; they are lost", len(rows), len(states))


_writers: dict[Path, Writer] = {}
_lock = threading.Lock()


def acquire(path: str | Path) -> Writer:
    """The shared writer for this database, started on first use (addons share one)."""
    key = Path(path).resolve()
    with _lock:
        writer = _writers.get(key)
        if writer is None:
            writer = _writers[key] = Writer(key)
            writer.start()
        writer._users += 1
        return writer


def release(writer: Writer) -> None:
    """Stop the writer when its last user lets go, after flushing what is queued."""
    with _lock:
        writer._users -= 1
        if writer._users > 0:
            return
        _writers.pop(writer.path, None)
    writer.stop()
