"""The capture writer's health, in a small file beside the database, for the UI to read.

A file and not a row, because what it reports matters exactly when the database refuses
writes: rows held in memory while SQLite says "database is locked" or "database or disk
is full", and rows given up for good. A row could only be updated once the database
takes writes again, so the dashboard would learn of an outage after it ended. The file
is created at its full size when the writer starts and is then overwritten in place,
which needs no new disk blocks: it can still be updated on a full disk, and a lock on
the database does not touch it. One writer per database owns it, as it owns the write
connection; the UI process only reads it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

log = logging.getLogger(__name__)

SIZE = 512  # bytes: the JSON, padded with spaces so that every write covers the same blocks
# A writer that is failing rewrites the file at least every few seconds; older news of a
# failure is from a process that has gone (killed, or stopped without being able to write).
FRESH_SECONDS = 15.0


@dataclass(frozen=True)
class CaptureStatus:
    dropped: int = 0  # flows never stored, since the database was created
    last_drop_at: float | None = None
    last_drop_reason: str | None = None
    waiting: int = 0  # flows held in memory because writes fail
    failing_since: float | None = None  # None while writes succeed
    error: str | None = None  # SQLite's message for the last failed write
    updated_at: float = 0.0

    def failing_now(self, now: float) -> bool:
        """Whether a running writer is failing right now (not a stale report of a gone one)."""
        return self.failing_since is not None and now - self.updated_at <= FRESH_SECONDS

    def encoded(self) -> bytes:
        status = self
        data = json.dumps(asdict(status)).encode()
        if len(data) > SIZE - 1:  # only the free-text messages can make it long
            status = replace(
                status, error=(status.error or "")[:80], last_drop_reason=(status.last_drop_reason or "")[:80]
            )
            data = json.dumps(asdict(status)).encode()
        return data.ljust(SIZE - 1) + b"\n"


def path_of(db_path: str | Path, worker: int | None = None) -> Path:
    """One process's file; each worker of `run.py proxy --workers N` has its own beside it."""
    return Path(f"{db_path}.capture" if worker is None else f"{db_path}.capture.{worker}")


def read(db_path: str | Path) -> CaptureStatus:
    """What every writer of the database last wrote, added up (workers each have a file)."""
    statuses = [_read_one(path_of(db_path))]
    statuses += [_read_one(p) for p in sorted(Path(db_path).parent.glob(f"{Path(db_path).name}.capture.*"))]
    found = [s for s in statuses if s.updated_at]
    if len(found) <= 1:
        return found[0] if found else statuses[0]
    failing = [s for s in found if s.failing_since is not None]
    drops = [s for s in found if s.last_drop_at is not None]
    last_drop = max(drops, key=lambda s: s.last_drop_at or 0.0) if drops else None
    return CaptureStatus(
        dropped=sum(s.dropped for s in found),
        last_drop_at=last_drop.last_drop_at if last_drop else None,
        last_drop_reason=last_drop.last_drop_reason if last_drop else None,
        waiting=sum(s.waiting for s in found),
        failing_since=min((s.failing_since for s in failing if s.failing_since), default=None),
        error=failing[0].error if failing else None,
        updated_at=max(s.updated_at for s in (failing or found)),
    )


def _read_one(path: Path) -> CaptureStatus:
    for _ in range(3):  # a read that meets a write half done sees broken JSON: read again
        try:
            data = path.read_bytes()
        except OSError:
            return CaptureStatus()
        try:
            fields = json.loads(data)
            return CaptureStatus(**{k: v for k, v in fields.items() if k in CaptureStatus.__dataclass_fields__})
        except (ValueError, TypeError):
            continue
    return CaptureStatus()


class StatusFile:
    """The writer's handle on the file: created 0600 at full size, then overwritten in place."""

    def __init__(self, db_path: str | Path, worker: int | None = None) -> None:
        self.path = path_of(db_path, worker)
        previous = _read_one(self.path)
        self.current = CaptureStatus(
            dropped=previous.dropped, last_drop_at=previous.last_drop_at, last_drop_reason=previous.last_drop_reason
        )
        if previous.waiting and previous.failing_since is not None:
            # The run before this one ended (killed, or stopped) while it still held these: they are gone.
            self.current = replace(
                self.current,
                dropped=previous.dropped + previous.waiting,
                last_drop_at=previous.updated_at,
                last_drop_reason="the proxy ended while it could not write them",
            )
        self._fd: int | None = None
        self._complained = False
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            log.warning("cannot keep capture's status in %s (%s); /metrics will not show dropped rows", self.path, e)
        self.write(self.current)

    def write(self, status: CaptureStatus) -> None:
        self.current = status = replace(status, updated_at=time.time())
        if self._fd is None:
            return
        try:
            os.pwrite(self._fd, status.encoded(), 0)
        except OSError as e:
            if not self._complained:
                log.warning("cannot update capture's status in %s (%s)", self.path, e)
                self._complained = True

    def update(self, **changes) -> None:
        self.write(replace(self.current, **changes))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
