"""tests/storage on both databases: each test that takes `database` or `conn` runs on SQLite and on PostgreSQL.

On PostgreSQL the path is still the one secrets are kept beside; every connection the code
opens goes to the test's own fresh database (storage/db.py use_postgres), as in a proxy
configured with `storage.url`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from storage import db


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """None for SQLite; the PostgreSQL database's URL, used by every connection of the test."""
    if request.param == "sqlite":
        yield None
        return
    url = request.getfixturevalue("postgres_url")
    db.use_postgres(url)
    try:
        yield url
    finally:
        db.use_postgres(None)


@pytest.fixture
def database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str | None) -> Path:
    """A fresh, migrated database (SQLite, or PostgreSQL with the path for secrets) whose secrets are generated."""
    monkeypatch.delenv("KEYROTOR_SECRET", raising=False)
    path = tmp_path / "kr.db"
    db.ensure_database(path)
    return path


@pytest.fixture
def sqlite_only(backend: str | None) -> None:
    """For tests of SQLite's own file: its locks, its WAL, its bytes on disk (PostgreSQL's outage: test_pg_outage.py)."""
    if backend is not None:
        pytest.skip("about SQLite's file, locks or WAL")
