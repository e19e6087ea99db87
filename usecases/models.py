"""A group's model list, shared by `run.py models refresh` and the UI: asked of upstream with a group key."""

from __future__ import annotations

from dataclasses import dataclass

import httpx

from core.models import KeyState
from core.ports import KeyStore, RouteStore
from core.routing import Group
from core.upstream import PROBE_TIMEOUT_SECONDS, ModelListError, list_models


@dataclass(frozen=True)
class Refresh:
    group: str  # UPSTREAM/GROUP
    added: int = 0
    removed: int = 0
    listed: int = 0
    error: str | None = None

    def as_dict(self) -> dict:
        return {
            "group": self.group,
            "added": self.added,
            "removed": self.removed,
            "listed": self.listed,
            "error": self.error,
        }


async def refresh_models(
    keys: KeyStore, routes: RouteStore, groups: list[Group], default_base_url: str
) -> list[Refresh]:
    """GET the model list of each group with one of its usable keys; the list replaces the last fetched one.

    Models added by hand stay; a group without a usable key, or whose upstream does not
    answer with a list, is reported and left as it was.
    """
    pool = keys.load_pool()
    results = []
    async with httpx.AsyncClient(timeout=PROBE_TIMEOUT_SECONDS) as client:
        for group in groups:
            usable = [k for k in pool if k.group_id == group.id and k.state in (KeyState.ACTIVE, KeyState.COOLING)]
            if not usable:
                results.append(Refresh(group.label, error="no usable key in this group"))
                continue
            try:
                listed = await list_models(client, group.upstream, default_base_url, usable[0].value)
            except ModelListError as e:
                results.append(Refresh(group.label, error=str(e)))
                continue
            added, removed = routes.store_fetched_models(group.id, listed)
            results.append(Refresh(group.label, added, removed, len(listed)))
    return results
