"""Upstream key administration shared by `run.py keys ...` and the UI: adding and re-validating."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass

import httpx

from core.classify import Outcome, OutcomeKind
from core.keys import parse_key_lines
from core.models import REFUSED, AddReport, KeyState
from core.ports import KeyStore
from core.routing import Group
from core.upstream import PROBE_TIMEOUT_SECONDS, probe

# What a probe's outcome makes of a key; other outcomes (5xx, no answer) leave it as it was.
STATE_AFTER_PROBE = {
    OutcomeKind.OK: KeyState.ACTIVE,
    OutcomeKind.RATE_LIMITED: KeyState.ACTIVE,
    OutcomeKind.INVALID: KeyState.INVALID,
    OutcomeKind.EXHAUSTED: KeyState.EXHAUSTED,
}


def add_keys(store: KeyStore, lines: Iterable[str], name: str | None = None, group_id: int | None = None) -> AddReport:
    """Add one key per line or NAME<TAB>KEY (`name` for the rest) to a group (None: default/default).

    Malformed lines are reported by number; ValueError when `name` cannot be a key's name.
    """
    parsed = parse_key_lines(lines, name)
    added, duplicates = store.insert(parsed.keys, group_id)
    return AddReport(added=added, duplicates=duplicates, malformed=parsed.malformed)


@dataclass(frozen=True)
class Validation:
    key_id: int
    last4: str
    outcome: Outcome
    state: KeyState  # the key's state afterwards

    def as_dict(self) -> dict:
        return {
            "id": self.key_id,
            "last4": self.last4,
            "result": self.outcome.kind,
            "reason": self.outcome.reason,
            "state": self.state,
        }


def ids_to_validate(store: KeyStore, ids: list[int] | None, every: bool) -> list[int]:
    """The given ids; with `every`, all keys but disabled ones; by default the invalid and exhausted."""
    if ids:
        return ids
    states = (KeyState.ACTIVE, KeyState.COOLING, *REFUSED) if every else REFUSED
    return store.ids_in_state(states)


async def validate_keys(
    store: KeyStore, groups: dict[int, Group], default_base_url: str, ids: list[int]
) -> list[Validation]:
    """Probe these keys at once, each at its group's upstream, and store what each answer says.

    Disabled keys, and keys whose group is gone, are left alone.
    """
    wanted = set(ids)
    keys = [
        (k, groups[k.group_id].upstream)
        for k in store.load_pool()
        if k.id in wanted and k.state != KeyState.DISABLED and k.group_id is not None and k.group_id in groups
    ]
    async with httpx.AsyncClient(timeout=PROBE_TIMEOUT_SECONDS) as client:
        outcomes = await asyncio.gather(*(probe(client, upstream, default_base_url, k.value) for k, upstream in keys))
    results = []
    for (key, _), outcome in zip(keys, outcomes, strict=True):
        state = STATE_AFTER_PROBE.get(outcome.kind, key.state)
        if state != key.state or state != KeyState.ACTIVE:
            reason = "re-validated" if state == KeyState.ACTIVE else outcome.reason
            store.set_admin_state([key.id], state, reason or state)
        results.append(Validation(key.id, key.last4, outcome, state))
    return results
