"""In-memory fakes of core's ports, and a backend of them for addons/runtime.py: addon tests without a database.

Each fake holds what a test put in it and answers as storage would; the writer keeps what
the addons wrote, for the test to look at. An admin change is a change to a store plus
`bump(name)`, as storage bumps a revision in the same transaction.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from addons.runtime import Runtime, Stores
from core.affinity import Ownership, TenantRefusal
from core.keys import NewKey
from core.models import Client, FetchedModels, KeyState, KeyStateChange, PoolKey
from core.records import CapturedFlow, Retention
from core.routing import DEFAULT, Dialect, Group, Upstream
from core.state import WATCHED
from storage.counters import MemoryCounters


def default_group(group_id: int = 1, models: dict[str, str | None] | None = None, **fields) -> Group:
    """The `default/default` group, on the reverse-proxy target."""
    upstream = Upstream(id=1, name=DEFAULT, base_url=None, dialect=Dialect.OPENAI, api_version=None, enabled=True)
    return Group(id=group_id, upstream=upstream, name=DEFAULT, models=models or {}, **fields)


def pool_key(key_id: int, value: str, group_id: int = 1, state: KeyState = KeyState.ACTIVE) -> PoolKey:
    return PoolKey(key_id, value, value[-4:], state, None, None, 1.0, 0, None, group_id)


@dataclass
class MemoryKeyStore:
    keys: list[PoolKey] = field(default_factory=list)

    def load_pool(self) -> list[PoolKey]:
        return [dataclasses.replace(k) for k in self.keys]  # fresh objects, as a read from storage gives

    def insert(self, keys: list[NewKey], group_id: int | None = None) -> tuple[list[int], int]:
        present = {k.value for k in self.keys}
        added = []
        for new in keys:
            if new.value in present:
                continue
            key_id = max((k.id for k in self.keys), default=0) + 1
            self.keys.append(pool_key(key_id, new.value, group_id or 1))
            present.add(new.value)
            added.append(key_id)
        return added, len(keys) - len(added)

    def ids_in_state(self, states: Iterable[KeyState]) -> list[int]:
        wanted = set(states)
        return [k.id for k in self.keys if k.state in wanted]

    def set_admin_state(self, key_ids: Iterable[int], state: KeyState, reason: str) -> int:
        ids = set(key_ids)
        for key in self.keys:
            if key.id in ids:
                key.state, key.state_reason = state, reason
        return len(ids)


@dataclass
class MemoryRouteStore:
    groups: list[Group] = field(default_factory=lambda: [default_group()])
    fallbacks: dict[str, list[str]] = field(default_factory=dict)

    def load_routes(self) -> tuple[list[Group], dict[str, list[str]]]:
        return list(self.groups), {m: list(f) for m, f in self.fallbacks.items()}

    def store_fetched_models(self, group_id: int, models: list[str]) -> tuple[int, int]:
        for i, group in enumerate(self.groups):
            if group.id == group_id:
                before = set(group.models)
                self.groups[i] = dataclasses.replace(group, models=dict.fromkeys(models), models_fetched=True)
                return len(set(models) - before), len(before - set(models))
        raise LookupError(group_id)


@dataclass
class MemoryClientStore:
    clients: dict[str, tuple[Client, int]] = field(default_factory=dict)  # key hash → (client, key id)

    def load_enabled(self) -> dict[str, tuple[Client, int]]:
        return dict(self.clients)


@dataclass
class MemoryObjectOwners:
    rows: list[tuple[str, int]] = field(default_factory=list)  # (object id, key id), in the order stored
    clients: dict[str, int] = field(default_factory=dict)  # object id → its client, where it has one

    def owners_since(self, after: int) -> tuple[dict[str, int], int]:
        return dict(self.rows[after:]), len(self.rows)

    def clients_since(self, after: int) -> dict[str, int]:
        return {i: self.clients[i] for i, _ in self.rows[after:] if i in self.clients}


@dataclass
class MemoryRevisions:
    values: dict[str, int] = field(default_factory=dict)
    reads: int = 0

    def read_all(self, names: tuple[str, ...]) -> tuple[int, ...]:
        self.reads += 1
        return tuple(self.values.get(name, 0) for name in names)

    def bump(self, name: str) -> None:
        self.values[name] = self.values.get(name, 0) + 1


@dataclass
class MemoryWriter:
    """The runtime's writer as the addons see it: every port's writes, kept in lists."""

    records: list[CapturedFlow] = field(default_factory=list)
    states: list[KeyStateChange] = field(default_factory=list)
    ownerships: list[Ownership] = field(default_factory=list)
    models: list[FetchedModels] = field(default_factory=list)
    refusals: list[TenantRefusal] = field(default_factory=list)
    retention: Retention = field(default_factory=Retention)
    backlog_bytes: int = 0
    started: bool = False
    stopped: bool = False

    def record(self, flow: CapturedFlow) -> None:
        self.records.append(flow)

    def save_state(self, change: KeyStateChange) -> None:
        self.states.append(change)

    def save_ownership(self, learnt: Ownership) -> None:
        self.ownerships.append(learnt)

    def save_models(self, fetched: FetchedModels) -> None:
        self.models.append(fetched)

    def save_refusal(self, refusal: TenantRefusal) -> None:
        self.refusals.append(refusal)


@dataclass
class MemoryAdminKeys:
    password: str = "argon2-hash-of-the-admin-key"
    changes: int = 0
    signing_key: bytes = b"memory-pass-signing-key"

    def version(self) -> object:
        return self.changes

    def mitmweb_password(self) -> str:
        return self.password

    def pass_key(self) -> bytes | None:
        return self.signing_key


@dataclass
class MemoryBackend:
    """addons/runtime.py's Backend over the fakes above."""

    keys: MemoryKeyStore = field(default_factory=MemoryKeyStore)
    routes: MemoryRouteStore = field(default_factory=MemoryRouteStore)
    clients: MemoryClientStore = field(default_factory=MemoryClientStore)
    owners: MemoryObjectOwners = field(default_factory=MemoryObjectOwners)
    store_revisions: MemoryRevisions = field(default_factory=MemoryRevisions)
    writer: MemoryWriter = field(default_factory=MemoryWriter)
    admin_keys: MemoryAdminKeys = field(default_factory=MemoryAdminKeys)
    counters: MemoryCounters | None = None
    revisions: MemoryRevisions | None = None
    opened: list[Path] = field(default_factory=list)
    reads: int = 0  # reads of the state (each would be one connection)

    def open(self, path: Path) -> None:
        self.opened.append(path)
        self.counters = MemoryCounters()
        self.revisions = self.store_revisions

    @contextmanager
    def stores(self) -> Iterator[Stores]:
        self.reads += 1
        yield Stores(self.keys, self.routes, self.clients, self.owners, self.store_revisions)

    def start(self) -> None:
        self.writer.started = True

    def stop(self) -> None:
        self.writer.stopped = True

    def change(self, name: str) -> None:
        """An admin change to `name` (one of core.state.WATCHED): storage bumps its revision."""
        assert name in WATCHED
        self.store_revisions.bump(name)


_paths = itertools.count()


def memory_runtime(backend: MemoryBackend | None = None, open_it: bool = True) -> Runtime:
    """A runtime over in-memory ports, opened as if keyrotor_storage had been set."""
    runtime = Runtime(backend or MemoryBackend())
    if open_it:
        runtime.open(Path(f"memory-{next(_paths)}"))
    return runtime
