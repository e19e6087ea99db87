"""The one writer thread: owns the proxy's write connection, inserts in batches.

Hooks on the event loop only put items on a queue. Turning a captured flow into a
record (decoding, JSON parsing, truncation) also happens here, off the loop: items
carry a `to_record()` method that this thread calls. It implements core's sinks:
RecordSink (captured flows), PoolStateSink (key states learnt upstream), OwnershipSink
(object owners) and ModelListSink (refreshed model lists). The proxy has one, built by
addons/runtime.py.

Durability, in the order it matters:
- kill -9 loses only what is not committed yet. Commits are GATHER_SECONDS apart at
  least, and a busy writer starts the next one as soon as that allows: at saturation
  batches grow by themselves, and a row waits at most that spacing plus two batches'
  write time. Each batch is a handful of statements, not a few per row (see
  storage.sql.insert_many), so a batch's write time stays short while the event loop
  holds the GIL. Still, compression makes a GIL-free call per row, and every such call
  waits for the busy event loop to hand the GIL back: see SWITCH_SECONDS.
- When the database refuses writes (locked by another connection for longer than the
  busy timeout, disk full, I/O error), the rows stay in memory, up to
  `backlog_bytes`, and the write is tried again with backoff. Beyond that the oldest
  rows are dropped, and every dropped row is counted in the status file beside the
  database (storage/capture_status.py), which the UI shows in /metrics and on the
  dashboard.
- A full disk: each failed write is retried with half as many rows (down to one), so
  that the space that returns is used at once, however little; batches grow back as
  writes succeed. A write-ahead log left large by a full disk or a long reader is
  checkpointed and truncated (after a failed write, and every CHECKPOINT_SECONDS while
  idle), and kept at JOURNAL_SIZE_LIMIT_BYTES after each checkpoint: the WAL does not
  grow without bound behind a reader that held it for a while.
- stop() writes what is queued; if the database still refuses, it keeps trying for
  STOP_RETRY_SECONDS and then counts what it drops.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import sys
import threading
import time
from collections import deque
from itertools import islice
from pathlib import Path
from typing import Protocol

from core.affinity import Ownership, TenantRefusal
from core.models import FetchedModels, KeyStateChange
from core.records import FlowRecord, Retention
from storage import audit, capture_status, conversion, db, flows, objects, outcomes, rollups, routes, upstream_keys

log = logging.getLogger(__name__)

MAX_BATCH = 2000  # rows per transaction
MAX_BATCH_BYTES = 16 * 2**20  # and their bodies at most this (one row always goes, whatever its size)
CHECKPOINT_SECONDS = 30.0  # how often an idle writer checkpoints and truncates the WAL
JOURNAL_SIZE_LIMIT_BYTES = 64 * 2**20  # what a checkpointed WAL is cut back to
GATHER_SECONDS = 0.05  # an idle writer waits this long after a first row: one commit for several
BUSY_TIMEOUT_MS = 1000  # then a locked database counts as a failed write: rows are kept, and retried
RETRY_SECONDS = (0.1, 0.25, 0.5, 1.0)  # waits between attempts while writes fail, the last repeating
STOP_RETRY_SECONDS = 5.0  # at shutdown, how long a failing database is retried before rows are dropped
DEFAULT_BACKLOG_BYTES = 256 * 2**20
ROW_OVERHEAD_BYTES = 2048  # a record's headers, timings and objects, besides its bodies
PURGE_SECONDS = 60.0  # how often retention is applied
COMPLAIN_SECONDS = 30.0  # while writes keep failing, a log line at most this often
# The writer's zstd and SQLite calls release the GIL; to take it back from an event loop
# that is busy, a thread waits out Python's switch interval, by default 5 ms. With one
# such wait per row, a batch of 40 took 200+ ms at saturation, and kill -9 could lose
# more than 250 ms of flows. At 0.5 ms the wait is a tenth; the loop only pays for it
# (a forced switch, microseconds) while the writer wants the GIL.
SWITCH_SECONDS = 0.0005


class Recordable(Protocol):
    """A captured flow (core.records.CapturedFlow), or anything else that makes a record."""

    def to_record(self) -> FlowRecord: ...


_STOP = object()


def record_bytes(record: FlowRecord) -> int:
    """Roughly what a record holds in memory: its bodies plus a fixed allowance."""
    bodies = len(record.request_body or "") + len(record.response_body or "")
    return bodies + len(record.request_body_bytes or b"") + len(record.response_body_bytes or b"") + ROW_OVERHEAD_BYTES


class Writer:
    def __init__(self, path: str | Path | None = None, backlog_bytes: int = DEFAULT_BACKLOG_BYTES) -> None:
        # The proxy builds its writer before the keyrotor_storage option says where (addons/runtime.py):
        # `path` is then set before start().
        self.path = Path(path) if path is not None else None
        self.worker: int | None = None  # with workers: this one's index, stamped on its flows (set before start())
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="keyrotor-writer", daemon=True)
        self._users = 0
        self.rows_written = 0
        self.rows_purged = 0
        self.rows_dropped = 0  # by this writer (the status file has the total since the database was created)
        self.retention = Retention()
        self.backlog_bytes = backlog_bytes
        self._next_purge = time.monotonic()  # the first round runs at start-up
        # Records taken off the queue and not yet committed, oldest first, and their size.
        self._pending: deque[tuple[FlowRecord, int]] = deque()
        self._pending_bytes = 0
        self._states: list[KeyStateChange | FetchedModels | Ownership | TenantRefusal] = []
        self._failures = 0  # failed writes in a row
        self._retry_at = 0.0
        self._last_write = 0.0
        self._complained_at = 0.0
        self._stopping = False
        self._stop_deadline = 0.0
        self._status: capture_status.StatusFile  # opened by the thread, first thing in _run
        self._packer = flows.FlowPacker()  # compresses in this thread, never on the event loop
        self._converting = True  # rows from before schema v8 may be left: checked at start-up
        self._batch_rows = MAX_BATCH  # halved by each failed write, doubled back by each one that succeeds
        self._next_checkpoint = time.monotonic() + CHECKPOINT_SECONDS
        self._convert_at = 0.0  # after a lock conflict, the next chunk waits until then

    def put(self, item: Recordable | KeyStateChange) -> None:
        self._queue.put(item)

    def record(self, flow: Recordable) -> None:
        self._queue.put(flow)

    def save_state(self, change: KeyStateChange) -> None:
        self._queue.put(change)

    def save_models(self, fetched: FetchedModels) -> None:
        self._queue.put(fetched)

    def save_ownership(self, learnt: Ownership) -> None:
        """Which key made (or answered for) which objects: key affinity (core/affinity.py)."""
        self._queue.put(learnt)

    def save_refusal(self, refusal: TenantRefusal) -> None:
        """A client named an object that is not its own: an audit entry (tenancy, core/affinity.py)."""
        self._queue.put(refusal)

    @property
    def started(self) -> bool:
        return self._thread.ident is not None

    def start(self) -> None:
        if self.path is None:
            raise ValueError("the writer has no database to write to")
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_SECONDS))
        self._thread.start()

    def stop(self, timeout: float = STOP_RETRY_SECONDS + 5.0) -> None:
        """Write everything still queued, then end the thread."""
        self._queue.put(_STOP)
        self._thread.join(timeout)

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        assert self.path is not None, "start() refuses a writer without one"
        self._status = capture_status.StatusFile(self.path, self.worker)
        conn = db.connect(self.path)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT_BYTES}")
        try:
            self._converting = conversion.pending(conn)
            while True:
                self._absorb(self._next_items())
                if (self._pending or self._states) and time.monotonic() >= self._retry_at:
                    self._flush(conn)
                if self._stopping and self._queue.empty():
                    if not self._pending and not self._states:
                        break
                    if time.monotonic() >= self._stop_deadline:
                        given_up = len(self._pending)
                        self._pending.clear()
                        self._drop(given_up, "the proxy stopped while it could not write them")
                        break
                if not self._failures and not self._pending and time.monotonic() >= self._next_purge:
                    self._purge(conn)
                elif not self._failures and not self._pending and time.monotonic() >= self._next_checkpoint:
                    self._checkpoint(conn)
                elif (
                    self._converting
                    and not (self._failures or self._pending or self._stopping)
                    and time.monotonic() >= self._convert_at
                ):
                    self._convert(conn)
        finally:
            conn.close()
            self._status.close()

    def _next_items(self) -> list:
        """What has queued, waiting for a first item only when there is nothing to write."""
        items = []
        now = time.monotonic()
        writable = (self._pending or self._states) and self._retry_at <= now
        if not writable and not (self._stopping and self._queue.empty()):
            if self._pending or self._states:
                wait = self._retry_at - now  # failing: wake up for the next attempt
            elif self._converting:
                wait = min(self._convert_at - now, self._next_purge - now)  # old rows: a chunk when idle
            else:
                wait = min(self._next_purge, self._next_checkpoint) - now
            try:
                items.append(self._queue.get(timeout=max(0.01, wait)) if wait > 0 else self._queue.get_nowait())
            except queue.Empty:
                return items
        # Commits at least GATHER_SECONDS apart: a lone row waits a little for company, and at
        # saturation every commit carries what arrived during the last one.
        wait = self._last_write + GATHER_SECONDS - time.monotonic()
        if wait > 0 and not self._stopping and _STOP not in items:
            time.sleep(wait)
        while len(items) < MAX_BATCH:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return items

    def _absorb(self, items: list) -> None:
        for item in items:
            if item is _STOP:
                self._stopping = True
                self._stop_deadline = time.monotonic() + STOP_RETRY_SECONDS
            elif isinstance(item, KeyStateChange | FetchedModels | Ownership | TenantRefusal):
                self._states.append(item)  # small, written with the next batch
            else:
                try:
                    record = item.to_record()
                except Exception:
                    log.exception("could not turn a captured flow into a record; it is skipped")
                    self._drop(1, "it could not be turned into a row")
                    continue
                if self.worker is not None:
                    record.worker = self.worker
                size = record_bytes(record)
                self._pending.append((record, size))
                self._pending_bytes += size
        over = 0
        while self._pending_bytes > self.backlog_bytes and len(self._pending) > 1:
            _, size = self._pending.popleft()
            self._pending_bytes -= size
            over += 1
        if over:
            self._drop(over, f"more than {self.backlog_bytes // 2**20} MB of flows were waiting to be written")

    def _flush(self, conn: sqlite3.Connection) -> None:
        self._last_write = time.monotonic()
        batch = self._next_batch()
        states = self._states
        try:
            self._write(conn, batch, states)
        except sqlite3.OperationalError as e:
            # Locked, disk full, I/O error: the database may take the same rows later, fewer at a time.
            self._batch_rows = max(1, len(batch) // 2)
            if e.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR):
                self._checkpoint(conn)  # a WAL cut back may be the space the next, smaller write needs
            self._failed(str(e))
            return
        except Exception:
            # Not the database's state but these rows (a constraint, a value SQLite refuses):
            # write them one by one, so that one bad row does not hold up the others.
            log.exception("writing a batch of %d flows failed; writing them one at a time", len(batch))
            batch = self._write_singly(conn, batch, states)
        for _ in batch:
            _, size = self._pending.popleft()
            self._pending_bytes -= size
        self._states = []
        self.rows_written += len(batch)
        self._batch_rows = min(MAX_BATCH, self._batch_rows * 2)
        if self._failures:
            log.warning(
                "capture writes again; the %d flows that were waiting are being stored", len(self._pending) + len(batch)
            )
            self._failures = 0
            self._status.update(waiting=len(self._pending), failing_since=None, error=None)
        elif self._status.current.waiting:  # after a failure, the backlog goes in chunks: say how much is left
            self._status.update(waiting=len(self._pending))
        self._retry_at = 0.0

    def _next_batch(self) -> list[FlowRecord]:
        """The oldest pending rows, as many as this attempt may write (rows and bytes): always one at least."""
        batch: list[FlowRecord] = []
        size = 0
        for record, record_size in islice(self._pending, self._batch_rows):
            if batch and size + record_size > MAX_BATCH_BYTES:
                break
            batch.append(record)
            size += record_size
        return batch

    def _checkpoint(self, conn: sqlite3.Connection) -> None:
        """The WAL copied into the database and truncated, as far as readers allow (they are not waited for)."""
        self._next_checkpoint = time.monotonic() + CHECKPOINT_SECONDS
        try:
            # Without the busy timeout: a reader still on an old snapshot is not waited for (capture
            # would wait behind it); what it does not hold is checkpointed now, the rest next time.
            conn.execute("PRAGMA busy_timeout = 0")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.Error as e:
            log.debug("checkpointing the WAL waits: %s", e)
        finally:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")

    def _write(
        self,
        conn: sqlite3.Connection,
        batch: list[FlowRecord],
        states: list[KeyStateChange | FetchedModels | Ownership | TenantRefusal],
    ) -> None:
        with conn:
            flows.insert_batch(conn, batch, self._packer)
            rollups.add_records(conn, batch)
            outcomes.add_records(conn, batch)
            learnt = [s for s in states if isinstance(s, Ownership)]
            if learnt:
                objects.record_in_transaction(conn, learnt)
            for change in states:
                if isinstance(change, Ownership):
                    continue
                if isinstance(change, TenantRefusal):
                    audit.record_refusal(conn, change)
                    continue
                if isinstance(change, FetchedModels):
                    routes.fetched_models_in_transaction(conn, change.group_id, change.models)
                    continue
                upstream_keys.record_state(
                    conn, change.key_id, change.state, change.reason, change.cooldown_until, change.at
                )

    def _write_singly(
        self,
        conn: sqlite3.Connection,
        batch: list[FlowRecord],
        states: list[KeyStateChange | FetchedModels | Ownership | TenantRefusal],
    ) -> list[FlowRecord]:
        refused = 0
        for index, record in enumerate(batch):
            try:
                self._write(conn, [record], states if index == 0 else [])
            except Exception:
                log.exception("a flow could not be stored; it is skipped")
                refused += 1
        if refused:
            self._drop(refused, "SQLite refused them")
        return batch

    def _failed(self, error: str) -> None:
        now = time.monotonic()
        self._failures += 1
        self._retry_at = now + RETRY_SECONDS[min(self._failures, len(RETRY_SECONDS)) - 1]
        if self._failures == 1 or now - self._complained_at >= COMPLAIN_SECONDS:
            self._complained_at = now
            log.warning(
                "capture cannot write to %s (%s); %d flows are kept in memory and the write is retried",
                db.where(self.path or ""),
                error,
                len(self._pending),
            )
        current = self._status.current
        self._status.update(
            waiting=len(self._pending),
            failing_since=current.failing_since or time.time(),
            error=error,
        )

    def _drop(self, count: int, reason: str) -> None:
        if not count:
            return
        self.rows_dropped += count
        log.error("%d captured flows are lost: %s", count, reason)
        current = self._status.current
        self._status.update(
            dropped=current.dropped + count,
            last_drop_at=time.time(),
            last_drop_reason=reason,
            waiting=len(self._pending),
        )

    def _purge(self, conn: sqlite3.Connection) -> None:
        """Apply retention a chunk at a time, yielding to capture whenever rows are waiting."""
        self._next_purge = time.monotonic() + PURGE_SECONDS
        keep = self.retention
        try:
            rollups.drop_old_minutes(conn, time.time())
            conn.commit()
            if not keep.keep_days and not keep.max_rows and not keep.max_bytes:
                return
            older_than = time.time() - keep.keep_days * 86400 if keep.keep_days else None
            if older_than is not None:
                audit.purge(conn, older_than)  # the audit log is kept as long as flows (capture.keep_days)
            oldest = flows.size_surplus(conn, keep.max_bytes) if keep.max_bytes else 0
            while True:
                deleted = flows.purge_chunk(conn, older_than, keep.max_rows or None, oldest)
                oldest = max(0, oldest - deleted)
                self.rows_purged += deleted
                if deleted < flows.PURGE_CHUNK:
                    return
                if not self._queue.empty():
                    self._next_purge = time.monotonic()  # capture first; carry on after its batch
                    return
        except sqlite3.Error:
            log.exception("applying retention failed; trying again in %d s", PURGE_SECONDS)

    def _convert(self, conn: sqlite3.Connection) -> None:
        """One chunk of the rows stored before schema v8, between capture's batches (storage/conversion.py)."""
        try:
            self._converting = conversion.convert_chunk(conn, self._packer) > 0
        except sqlite3.OperationalError as e:
            # Locked (run.py storage migrate converting beside us, a reader's checkpoint): later.
            log.debug("converting old flows waits: %s", e)
            self._convert_at = time.monotonic() + RETRY_SECONDS[-1]
        except Exception:
            log.exception("converting flows stored before schema v8 failed; `run.py storage migrate` retries it")
            self._converting = False
        else:
            if not self._converting:
                log.info("every flow stored before schema v8 is converted")


_writers: dict[Path, Writer] = {}
_lock = threading.Lock()


def acquire(path: str | Path) -> Writer:
    """The shared writer for this database, started on first use (the proxy's runtime builds its own)."""
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
        if writer.path is not None:  # it is, for a writer from acquire()
            _writers.pop(writer.path, None)
    writer.stop()
