"""The monitor UI's admin sessions, held server-side so that logging out ends one for good.

A sidecar file beside the database (`<db>.sessions`, mode 0600), like the other secrets,
and not a table: sessions are credentials, not data, and `run.py admin rotate` must be
able to end them all while the UI runs, from another process. It holds the SHA-256 of
each live session token with its expiry, never a token. Readers take a shared lock,
writers an exclusive one (flock), so the UI's threads and the CLI never see half a write.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Enough for every browser an admin could use; the oldest go first beyond it, so the
# file (read on every UI request) stays small whatever logs in.
MAX_SESSIONS = 200


def _path(db_path: str | Path) -> Path:
    return Path(f"{db_path}.sessions")


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@contextmanager
def _locked(db_path: str | Path, exclusive: bool) -> Iterator[int]:
    fd = os.open(_path(db_path), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield fd
    finally:
        os.close(fd)  # releases the lock


def _read(fd: int) -> dict[str, float]:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    try:
        sessions = json.loads(b"".join(chunks) or b"{}")
    except ValueError:
        return {}  # a damaged file ends every session: logging in again is the remedy
    return sessions if isinstance(sessions, dict) else {}


def _write(fd: int, sessions: dict[str, float]) -> None:
    data = json.dumps(sessions).encode()
    os.lseek(fd, 0, os.SEEK_SET)
    os.ftruncate(fd, 0)
    os.write(fd, data)


def add(db_path: str | Path, token: str, expires_at: float, now: float) -> None:
    with _locked(db_path, exclusive=True) as fd:
        sessions = {k: v for k, v in _read(fd).items() if isinstance(v, int | float) and v > now}
        sessions[_digest(token)] = expires_at
        if len(sessions) > MAX_SESSIONS:
            sessions = dict(sorted(sessions.items(), key=lambda item: item[1])[-MAX_SESSIONS:])
        _write(fd, sessions)


def is_live(db_path: str | Path, token: str, now: float) -> bool:
    with _locked(db_path, exclusive=False) as fd:
        expires_at = _read(fd).get(_digest(token))
    return isinstance(expires_at, int | float) and expires_at > now


def end(db_path: str | Path, token: str) -> None:
    with _locked(db_path, exclusive=True) as fd:
        sessions = _read(fd)
        if sessions.pop(_digest(token), None) is not None:
            _write(fd, sessions)


def end_all(db_path: str | Path) -> int:
    """End every session; returns how many were live or not yet pruned."""
    with _locked(db_path, exclusive=True) as fd:
        count = len(_read(fd))
        _write(fd, {})
    return count
