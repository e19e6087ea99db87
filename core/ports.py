"""The ports: what the domain needs from storage, as small Protocols that storage/ implements.

SQLite implements them today (storage/); PostgreSQL and Redis can implement the same.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from core.keys import NewKey
from core.models import KeyState, KeyStateChange, PoolKey
from core.records import CapturedFlow


class KeyStore(Protocol):
    """Upstream keys: values encrypted at rest, in clear only in memory."""

    def load_pool(self) -> list[PoolKey]: ...

    def insert(self, keys: list[NewKey], group_id: int | None = None) -> tuple[list[int], int]:
        """Add new keys to a group (None: the default one); returns (ids added, how many were already there)."""
        ...

    def ids_in_state(self, states: Iterable[KeyState]) -> list[int]: ...

    def set_admin_state(self, key_ids: Iterable[int], state: KeyState, reason: str) -> int:
        """An admin's change (enable, disable, reset, re-validated); running proxies reload it."""
        ...


class RouteStore(Protocol):
    """Upstreams, groups and their models."""

    def store_fetched_models(self, group_id: int, models: list[str]) -> tuple[int, int]:
        """Replace what the last refresh found with `models`; returns (added, removed)."""
        ...


class RecordSink(Protocol):
    """Where captured flows go; called on the event loop, so it must never block."""

    def record(self, flow: CapturedFlow) -> None: ...


class PoolStateSink(Protocol):
    """Where key states learnt from upstream go; called on the event loop, never blocks."""

    def save_state(self, change: KeyStateChange) -> None: ...


class Revisions(Protocol):
    """Counters bumped by every admin change to a kind of thing ("keys", "clients")."""

    def read_all(self, names: tuple[str, ...]) -> tuple[int, ...] | None:
        """The current revisions of `names`, in one read; None when they cannot be read right now."""
        ...


class Counters(Protocol):
    """Atomic counters over time windows, for exact client limits (in memory, SQLite or Redis).

    No backend implements it yet: the client-governance work (issue 13) adds them.
    """

    def add(self, name: str, amount: int, window_seconds: float) -> int:
        """Add `amount` to `name` in the current window and return the new total, atomically."""
        ...
