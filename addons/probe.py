"""A key's health check: GET /v1/models with it, which costs no tokens.

Used by the proxy's scheduled re-validation, `run.py keys validate` and the UI's API;
free of mitmproxy imports for the latter two.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from dataclasses import dataclass

import httpx

from addons.classify import OK, Outcome, classify_response, connection_failure
from storage import upstream_keys
from storage.secrets import KeyCipher

# What a probe's outcome makes of a key; other outcomes (5xx, no answer) leave it as it was.
STATE_AFTER_PROBE = {"ok": "active", "rate_limited": "active", "invalid": "invalid", "exhausted": "exhausted"}
PROBE_TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True)
class Validation:
    key_id: int
    last4: str
    outcome: Outcome
    state: str  # the key's state afterwards

    def as_dict(self) -> dict:
        return {"id": self.key_id, "last4": self.last4, "result": self.outcome.kind,
                "reason": self.outcome.reason, "state": self.state}  # fmt: skip


async def probe(client: httpx.AsyncClient, upstream: str, value: str) -> Outcome:
    """The outcome of one GET /v1/models with `value` against `upstream` (scheme://host[:port])."""
    try:
        response = await client.get(f"{upstream.rstrip('/')}/v1/models", headers={"authorization": f"Bearer {value}"})
    except httpx.HTTPError as e:
        return connection_failure(f"{type(e).__name__}: {e}")
    # Anything but a key failure (a 404 from a server without /v1/models, say) means the key got in.
    outcome = classify_response(response.status_code, response.headers, response.content, time.time())
    return outcome if outcome is not None and outcome.is_key_failure else OK


def ids_to_validate(conn: sqlite3.Connection, ids: list[int] | None, every: bool) -> list[int]:
    """The given ids; with `every`, all keys but disabled ones; by default the invalid and exhausted."""
    if ids:
        return ids
    states = ("active", "cooling", "invalid", "exhausted") if every else ("invalid", "exhausted")
    return upstream_keys.ids_in_state(conn, states)


async def validate_keys(conn: sqlite3.Connection, cipher: KeyCipher, upstream: str, ids: list[int]) -> list[Validation]:
    """Probe these keys at once and store what each answer says (disabled keys are left alone)."""
    wanted = set(ids)
    keys = [k for k in upstream_keys.load_pool(conn, cipher) if k.id in wanted and k.state != "disabled"]
    async with httpx.AsyncClient(timeout=PROBE_TIMEOUT_SECONDS) as client:
        outcomes = await asyncio.gather(*(probe(client, upstream, k.value) for k in keys))
    results = []
    for key, outcome in zip(keys, outcomes, strict=True):
        state = STATE_AFTER_PROBE.get(outcome.kind, key.state)
        if state != key.state or state != "active":
            reason = "re-validated" if state == "active" else outcome.reason
            upstream_keys.set_admin_state(conn, [key.id], state, reason or state)
        results.append(Validation(key.id, key.last4, outcome, state))
    return results
