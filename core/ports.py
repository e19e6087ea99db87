"""The ports: what the domain needs from storage, as small Protocols that storage/ implements.

SQLite implements them today (storage/); PostgreSQL and Redis can implement the same.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager
from typing import Protocol

from core.affinity import Ownership, TenantRefusal
from core.keys import NewKey
from core.models import Client, FetchedModels, KeyState, KeyStateChange, PoolKey
from core.pool import Rested
from core.records import CapturedFlow, Retention
from core.routing import Group


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

    def load_routes(self) -> tuple[list[Group], dict[str, list[str]]]:
        """Every group with its upstream and models (disabled ones too), and each model's fallback models."""
        ...


class ClientStore(Protocol):
    """Clients and their keys, kept as SHA-256 hashes."""

    def load_enabled(self) -> dict[str, tuple[Client, int]]:
        """Key hash → (client, key id): the keys of enabled clients that are not revoked."""
        ...


class ObjectOwners(Protocol):
    """Which upstream key owns which object (key affinity), in the order they were stored."""

    def owners_since(self, after: int) -> tuple[dict[str, int], int]:
        """Owners stored after position `after` (object id → key id), and the position of the last one read."""
        ...

    def clients_since(self, after: int) -> dict[str, int]:
        """The clients of the objects stored after position `after` that have one (object id → client id)."""
        ...


class RecordSink(Protocol):
    """Where captured flows go; called on the event loop, so it must never block."""

    retention: Retention  # which flows it deletes as it goes
    backlog_bytes: int  # how much it may hold in memory while storage refuses writes

    def record(self, flow: CapturedFlow) -> None: ...


class PoolStateSink(Protocol):
    """Where key states learnt from upstream go; called on the event loop, never blocks."""

    def save_state(self, change: KeyStateChange) -> None: ...


class RestSink(Protocol):
    """With workers: where a pool's rests go, for the other workers (storage/workers.py); never blocks."""

    def save_rests(self, group_id: int, rests: list[Rested]) -> None: ...


class OwnershipSink(Protocol):
    """Where learnt object owners go; called on the event loop, never blocks."""

    def save_ownership(self, learnt: Ownership) -> None: ...


class RefusalSink(Protocol):
    """Where cross-tenant refusals go: the audit log, written off the event loop."""

    def save_refusal(self, refusal: TenantRefusal) -> None: ...


class ModelListSink(Protocol):
    """Where a group's refreshed model list goes; never blocks."""

    def save_models(self, fetched: FetchedModels) -> None: ...


class Revisions(Protocol):
    """Counters bumped by every admin change to a kind of thing ("keys", "clients")."""

    def read_all(self, names: tuple[str, ...]) -> tuple[int, ...] | None:
        """The current revisions of `names`, in one read; None when they cannot be read right now."""
        ...


class StateStores(Protocol):
    """What one read of the proxy's state uses (core/state.py): the stores, and the revisions read beside them."""

    keys: KeyStore
    routes: RouteStore
    clients: ClientStore
    owners: ObjectOwners
    revisions: Revisions


class AdminKeys(Protocol):
    """The admin key, as mitmweb asks for it."""

    def version(self) -> object:
        """Something that changes whenever the admin key does (None when there is none)."""
        ...

    def mitmweb_password(self) -> str:
        """The admin key's hash, as mitmweb's web_password option takes it."""
        ...

    def pass_key(self) -> bytes | None:
        """The key UI passes are signed with (core/passes.py); None while no database is open."""
        ...


class Counters(Protocol):
    """The numbers behind client limits: moving windows, calendar totals and gauges, by name.

    Calls are synchronous and never block (no I/O on the caller's thread): core.limits.Governor
    reads and adds in one call, which is what makes the limits exact. storage/counters.py keeps
    them in memory and persists them to SQLite off the caller's thread (one machine); a Redis
    backend would do the Governor's read-and-add in one script.
    """

    def moving_total(self, name: str, window_seconds: float, now: float) -> tuple[float, float | None]:
        """What `name` holds in the window ending `now`, and when its oldest entry came (None: empty)."""
        ...

    def moving_add(self, name: str, amount: float, now: float) -> object:
        """Add an entry to `name`'s window; returns a handle for moving_adjust."""
        ...

    def moving_adjust(self, name: str, entry: object, amount: float) -> None:
        """Replace an entry's amount (an estimate settled to what was reported)."""
        ...

    def period_total(self, name: str) -> float:
        """A calendar total (the name says which period: spend:5:usd:day:2026-12-01)."""
        ...

    def period_add(self, name: str, amount: float) -> None: ...

    def gauge(self, name: str) -> int:
        """What is in progress now (requests in flight); not kept across restarts."""
        ...

    def gauge_add(self, name: str, delta: int) -> None: ...

    def atomic(self) -> AbstractContextManager[None]:
        """One decision's reads and adds as one step: nothing another process adds comes between them
        (a no-op in one process, where calls on the loop cannot interleave; a transaction with workers,
        whose calls may raise core.limits.CountersUnavailable)."""
        ...
