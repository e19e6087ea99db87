"""What the proxy serves from: one snapshot of routes, keys, clients and object owners.

One per proxy process (addons/runtime.py builds it and hands it to the addons). It is read
over the ports (core/ports.py), never from storage directly, and refreshed by one revision
watcher: an admin change bumps a revision, the watcher reads what it changed in a worker
thread, and the change is swapped in on the event loop, where the hooks read the snapshot.
Nothing on the hot path touches storage.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

from core.affinity import Ownership
from core.models import Client, KeyStateChange, PoolKey
from core.pool import Rested
from core.ports import PoolStateSink, RestSink, Revisions, StateStores
from core.revisions import watch_revision
from core.rotation import Rotation, RotationSettings
from core.routing import Candidate, Group, RouteTable

log = logging.getLogger(__name__)

# The revisions that admin changes bump (storage bumps them under the same names).
KEYS = "keys"
ROUTES = "routes"
CLIENTS = "clients"
OBJECTS = "objects"  # bumped when new object owners are stored: read a few new rows at a time
WATCHED = (KEYS, ROUTES, CLIENTS, OBJECTS)


@dataclass
class Loaded:
    """What one read found changed; None: unchanged since the last read."""

    revisions: dict[str, int] = field(default_factory=dict)
    routes: tuple[list[Group], dict[str, list[str]]] | None = None
    keys: list[PoolKey] | None = None  # read with the routes: keys are placed in their groups' pools
    clients: dict[str, tuple[Client, int]] | None = None
    owners: dict[str, int] = field(default_factory=dict)  # owners stored since the last read
    tenants: dict[str, int] = field(default_factory=dict)  # their clients, where they have one
    owners_after: int = 0


class ProxyState:
    """The route table, a Rotation (pool and runtime health) per group, enabled clients by key
    hash, and object owners. The dicts are changed in place, never replaced: a hook may hold
    `rotations.get` or `owners`."""

    def __init__(self, states: PoolStateSink | None = None) -> None:
        self.table = RouteTable([])
        self.rotations: dict[int, Rotation] = {}  # group id → its pool and what requests live through in it
        self.clients: dict[str, tuple[Client, int]] = {}  # key hash → (client, key id)
        self.clients_by_id: dict[int, Client] = {}
        self.owners: dict[str, int] = {}  # object id → the key that owns it
        self.tenants: dict[str, int] = {}  # object id → the client that made it (missing: nobody's)
        self.settings = RotationSettings()
        self.states = states  # where every rotation's learnt key states go
        self.rests: RestSink | None = None  # with workers: where every pool's rests go (addons/runtime.py)
        self.client_listeners: list[Callable[[], None]] = []  # called on the loop once clients are reloaded
        self._open: Callable[[], AbstractContextManager[StateStores]] | None = None
        self._loaded: dict[str, int] = {}  # the revisions the snapshot holds (missing: never read)
        self._owners_after = 0

    @property
    def keys(self) -> list[PoolKey]:
        return [k for rotation in self.rotations.values() for k in rotation.pool.keys]

    def attach(self, open_stores: Callable[[], AbstractContextManager[StateStores]]) -> None:
        """Read from these stores from now on (the database was set): everything is read again, now."""
        self._open = open_stores
        self._loaded = {}
        self.owners.clear()
        self.tenants.clear()
        self._owners_after = 0
        self.apply(self.read())

    def configure(self, settings: RotationSettings) -> None:
        """How every group's keys rotate (the keypool_* options)."""
        self.settings = settings
        for rotation in self.rotations.values():
            rotation.configure(settings)

    def revisions(self) -> tuple[int, ...]:
        """The watched revisions as the snapshot holds them."""
        return tuple(self._loaded.get(name, -1) for name in WATCHED)

    async def watch(self, revisions: Revisions, nudge: asyncio.Event | None = None) -> None:
        """Reload what admin changes touch, for as long as the proxy runs (the process's one poller);
        `nudge`: set when another process announces a change (core/revisions.py)."""
        await watch_revision(revisions, WATCHED, self.read, self.revisions(), self.apply, nudge)

    # ------------------------------------------------------------------ reading (a worker thread)

    def read(self) -> Loaded:
        """What changed since the last read, over the ports (in a worker thread when reloading)."""
        if self._open is None:
            return Loaded()
        with self._open() as stores:
            current = stores.revisions.read_all(WATCHED)
            loaded = Loaded(dict(zip(WATCHED, current, strict=True)) if current is not None else {})
            if self._moved(loaded, KEYS, ROUTES):
                loaded.routes = stores.routes.load_routes()
                loaded.keys = stores.keys.load_pool()
                log.info(
                    "routes loaded: %d groups; upstream keys: %d, %d active",
                    len(loaded.routes[0]),
                    len(loaded.keys),
                    sum(k.state == "active" for k in loaded.keys),
                )
            if self._moved(loaded, CLIENTS):
                loaded.clients = stores.clients.load_enabled()
                log.info(
                    "client keys loaded: %d enabled, of %d clients",
                    len(loaded.clients),
                    len({client.id for client, _ in loaded.clients.values()}),
                )
            if self._moved(loaded, OBJECTS):
                loaded.owners, loaded.owners_after = stores.owners.owners_since(self._owners_after)
                loaded.tenants = stores.owners.clients_since(self._owners_after)
        return loaded

    def _moved(self, loaded: Loaded, *names: str) -> bool:
        return any(name not in loaded.revisions or self._loaded.get(name) != loaded.revisions[name] for name in names)

    # ------------------------------------------------------------------ swapping in (on the loop)

    def apply(self, loaded: Loaded) -> None:
        """Swap in what was read, keeping each pool's runtime state."""
        if loaded.routes is not None and loaded.keys is not None:
            routes_moved = self._moved(loaded, ROUTES)
            self._apply_routes(*loaded.routes, loaded.keys)
            if routes_moved:  # a model list refreshed or edited: upstream is believed again
                for rotation in self.rotations.values():
                    rotation.missing.clear()
        if loaded.clients is not None:
            self.clients = loaded.clients
            self.clients_by_id = {client.id: client for client, _ in loaded.clients.values()}
            for listener in self.client_listeners:
                listener()
        self.apply_owners(loaded.owners, loaded.tenants, loaded.owners_after)
        for name in WATCHED:
            # A revision that could not be read stays unknown: the next change reads everything again.
            if name in loaded.revisions:
                self._loaded[name] = loaded.revisions[name]
            else:
                self._loaded.pop(name, None)

    def learn(self, learnt: Ownership) -> None:
        """What an answer taught, at once (storage learns it through the writer)."""
        for owned in learnt.owned:
            self.owners.setdefault(owned.id, learnt.key_id)
            client_id = learnt.client_of(owned.id)
            if client_id is not None and owned.id not in self.tenants:
                self.tenants[owned.id] = client_id

    @property
    def attached(self) -> bool:
        return self._open is not None

    def read_owners(self) -> tuple[dict[str, int], dict[str, int], int]:
        """Owners stored since the last read, now (in a worker thread; `apply_owners` on the loop):
        a request names an object this process has not heard of, which another proxy on the same
        storage may have made."""
        if self._open is None:
            return {}, {}, 0
        after = self._owners_after
        with self._open() as stores:
            owners, last = stores.owners.owners_since(after)
            return owners, stores.owners.clients_since(after), last

    def apply_owners(self, owners: dict[str, int], tenants: dict[str, int], after: int) -> None:
        for object_id, key_id in owners.items():
            self.owners.setdefault(object_id, key_id)  # what this process learnt first agrees with storage
        for object_id, client_id in tenants.items():
            self.tenants.setdefault(object_id, client_id)
        self._owners_after = max(self._owners_after, after)

    def absorb(self, learnt: list[KeyStateChange | tuple[int, Rested]], now: float) -> None:
        """What other workers learnt from upstream (storage/workers.py), swapped in on the loop:
        key states, newer than this process's own, and rests of a pool or of a key for a model."""
        for item in learnt:
            if isinstance(item, KeyStateChange):
                key = self._key(item.key_id)
                if key is None or (key.state_changed_at or 0) > item.at or key.state == "disabled":
                    continue
                if key.state != item.state:
                    log.info(
                        "upstream key #%d …%s is now %s (%s), as another proxy learnt",
                        key.id,
                        key.last4,
                        item.state,
                        item.reason or "ok",
                    )
                key.state, key.state_reason, key.cooldown_until = item.state, item.reason, item.cooldown_until
                key.state_changed_at = item.at
                continue
            group_id, rested = item
            rotation = self.rotations.get(group_id)
            if rotation is not None:
                rotation.pool.absorb(rested, now)

    def in_flight(self) -> dict[int, int]:
        """Key id → requests in flight on it in this process (told to the other workers for least_used)."""
        return {
            key_id: rt.in_flight
            for rotation in self.rotations.values()
            for key_id, rt in rotation.pool.runtime.items()
            if rt.in_flight
        }

    def absorb_in_flight(self, elsewhere: dict[int, int]) -> None:
        """The other workers' requests in flight, by key: least_used counts them with this process's own."""
        for rotation in self.rotations.values():
            for key_id, rt in rotation.pool.runtime.items():
                rt.elsewhere = elsewhere.get(key_id, 0)

    def _key(self, key_id: int) -> PoolKey | None:
        for rotation in self.rotations.values():
            key = rotation.pool.by_id.get(key_id)
            if key is not None:
                return key
        return None

    def usable(self, candidates: list[Candidate]) -> list[Candidate]:
        """`candidates` without the routes whose upstream said it has no such model (a deployment that
        does not exist), unless that leaves none: then upstream's own answer is what the client gets."""
        kept = [c for c in candidates if not self._missing(c)]
        return kept if kept and len(kept) < len(candidates) else candidates

    def _missing(self, candidate: Candidate) -> bool:
        rotation = self.rotations.get(candidate.group.id)
        return (
            rotation is not None
            and candidate.upstream_model is not None
            and candidate.upstream_model in rotation.missing
        )

    def legacy_allowed(self, client_id: int) -> bool:
        """Whether the client may reach objects that belong to no client (`--legacy-objects`)."""
        client = self.clients_by_id.get(client_id)
        return client is not None and client.legacy_objects

    def _apply_routes(self, groups: list[Group], fallbacks: dict[str, list[str]], keys: list[PoolKey]) -> None:
        by_group: dict[int, list[PoolKey]] = {g.id: [] for g in groups}
        by_id = {g.id: g for g in groups}
        for key in keys:
            if key.group_id in by_group:
                by_group[key.group_id].append(key)
        for group_id, group_keys in by_group.items():
            rotation = self.rotations.get(group_id)
            if rotation is None:
                rotation = self.rotations[group_id] = Rotation()
                rotation.configure(self.settings)
                rotation.states = self.states
                rotation.group_id = group_id
                if self.rests is not None:
                    rotation.rests, rotation.pool.shared = self.rests, []
            rotation.pool.replace_keys(group_keys)
            group = by_id[group_id]
            rotation.label = group.label
            rotation.announce_usable(serving=group.enabled and group.upstream.enabled)
        for group_id in set(self.rotations) - set(by_group):
            del self.rotations[group_id]
        self.table = RouteTable(groups, fallbacks)
