"""How pages name upstream keys, clients, upstreams and groups: `name (…abcd)`, names and labels, never bare ids."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field

from storage import client_keys, routes, upstream_keys


def key_label(key_id: int, name: str | None, last4: str | None) -> str:
    """`Key 1 (…abcd)`; a key without a name is `#3 (…abcd)`, a deleted one `#3 (deleted)`."""
    if last4 is None:
        return f"#{key_id} (deleted)"
    return f"{name} (…{last4})" if name else f"#{key_id} (…{last4})"


@dataclass(frozen=True)
class Names:
    """The labels of the keys and clients one page shows, looked up once for the whole page."""

    keys: dict[int, tuple[str | None, str]] = field(default_factory=dict)
    clients: dict[int, str] = field(default_factory=dict)

    def key(self, key_id: int | None) -> str | None:
        if key_id is None:
            return None
        name, last4 = self.keys.get(key_id, (None, None))
        return key_label(key_id, name, last4)

    def client(self, client_id: int | None) -> str | None:
        if client_id is None:
            return None
        return self.clients.get(client_id) or f"#{client_id} (deleted)"


def names_for(conn: sqlite3.Connection, key_ids: Iterable[int | None] = (), client_ids: Iterable[int | None] = ()):
    """One query per kind for every id a page mentions (a page shows at most a few hundred)."""
    return Names(upstream_keys.labels_of(conn, key_ids), client_keys.names_of(conn, client_ids))


@dataclass(frozen=True)
class RouteNames:
    """Upstreams by name and groups by UPSTREAM/GROUP label; ids of deleted ones say so."""

    upstreams: dict[int, str] = field(default_factory=dict)
    groups: dict[int, str] = field(default_factory=dict)

    def upstream(self, upstream_id: int | None) -> str | None:
        if upstream_id is None:
            return None
        return self.upstreams.get(upstream_id) or f"#{upstream_id} (deleted)"

    def group(self, group_id: int | None) -> str | None:
        if group_id is None:
            return None
        return self.groups.get(group_id) or f"#{group_id} (deleted)"


def route_names(conn: sqlite3.Connection) -> RouteNames:
    """Every upstream's and group's name: two small tables, read once per page."""
    return RouteNames(routes.upstream_names(conn), routes.group_labels(conn))
