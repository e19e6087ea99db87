"""Rotating keys over time: waiting for one, counting attempts, retrying, re-validating.

One Rotation per upstream group. The pool (core/pool.py) knows which key is usable
now; this adds what a request lives through in that group: it waits up to
`wait_max_seconds` for a key, records each attempt, and turns what the pool learnt
into state changes for storage. core/failover.py moves a request across keys,
groups and fallback models.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field

import httpx

from core import upstream
from core.classify import Outcome
from core.errors import OpenAIError
from core.metadata import KeyUse
from core.models import REFUSED, KeyState, KeyStateChange, PoolKey
from core.pool import Policy, Pool, StateChange
from core.ports import PoolStateSink
from core.records import AttemptLog
from core.routing import Candidate, Upstream

log = logging.getLogger(__name__)

PROOF_POLL_SECONDS = 0.02


@dataclass(frozen=True)
class RotationSettings:
    strategy: str = "round_robin"
    max_attempts: int = 3
    wait_max_seconds: float = 5
    policy: Policy = field(default_factory=Policy)


class Rotation:
    def __init__(self, pool: Pool | None = None) -> None:
        self.pool = pool or Pool()
        self.settings = RotationSettings()
        self.states: PoolStateSink | None = None

    def configure(self, settings: RotationSettings) -> None:
        self.settings = settings
        self.pool.policy = settings.policy

    # ------------------------------------------------------------------ keys

    def pick_now(self) -> PoolKey | None:
        return self.pool.pick(self.settings.strategy, time.time())

    def release(self, use: KeyUse, error: str) -> None:
        """End the latest attempt without learning from it: the client went away first."""
        attempt = use.attempts[-1]
        attempt.error = error
        attempt.duration_ms = round((time.time() - attempt.started_at) * 1000, 3)
        key = self.pool.by_id.get(use.key_id)
        if key is not None:
            self.pool.finished(key, probe_abandoned=use.probe)

    async def acquire(self, exclude: frozenset[int], deadline: float) -> PoolKey | None:
        """A usable key, waiting until `deadline` for a cooling one to come back."""
        strategy = self.settings.strategy
        while True:
            now = time.time()
            key = self.pool.pick(strategy, now, exclude)
            if key is not None:
                return key
            if self.pool.awaiting_proof():
                if now + PROOF_POLL_SECONDS > deadline:
                    # No time to wait for a new key's first answer: share it rather than fail.
                    return self.pool.pick(strategy, now, exclude, busy_ok=True)
                await asyncio.sleep(PROOF_POLL_SECONDS)
                continue
            wait = self.pool.soonest_return(now)
            if wait is None or now + wait > deadline:
                return None
            await asyncio.sleep(max(wait, PROOF_POLL_SECONDS))  # a probe in flight ends the wait early or late

    def wait_deadline(self) -> float:
        return time.time() + self.settings.wait_max_seconds

    # ------------------------------------------------------------------ attempts

    def begin(self, use: KeyUse, key: PoolKey, route: Candidate | None = None, model: str | None = None) -> None:
        """Count an attempt with `key`; `route` says where it goes, `model` is set for a fallback."""
        now = time.time()
        use.probe = self.pool.started(key, now)
        use.key_id, use.key_last4 = key.id, key.last4
        attempt = AttemptLog(attempt=len(use.attempts) + 1, key_id=key.id, started_at=now, model=model)
        if route is not None:
            use.group_id = attempt.group_id = route.group.id
            use.upstream_id = attempt.upstream_id = route.group.upstream.id
        use.attempts.append(attempt)

    def end(self, use: KeyUse, outcome: Outcome | None, status: int | None, error: str | None) -> None:
        now = time.time()
        attempt = use.attempts[-1]
        attempt.status, attempt.error = status, error
        attempt.duration_ms = round((now - attempt.started_at) * 1000, 3)
        use.outcome = outcome.kind if outcome else None
        key = self.pool.by_id.get(use.key_id)
        if key is None:
            return  # deleted by an admin while the request ran
        self.pool.finished(key)
        self.persist(self.pool.learn(key, outcome, now, use.probe), now)

    def no_key_error(self, attempts: int) -> OpenAIError:
        """keyrotor's own 503 when no key could serve: with a Retry-After only when waiting helps.

        An SDK waits as long as Retry-After says before it tries again, and gives up at once
        on `x-should-retry: false`: so a pool with no key at all, or with keys that only an
        admin can bring back (invalid, exhausted, disabled), says not to retry.
        """
        keys = self.pool.keys
        if not keys:
            return OpenAIError(
                503,
                "No upstream API key is configured for this request's upstream group: add one with"
                " `run.py keys add` (or on the UI's keys page).",
                "server_error",
                "no_upstream_key_configured",
                {"x-should-retry": "false"},
            )
        tried = f" after {attempts} attempt{'s' if attempts != 1 else ''} with different keys" if attempts else ""
        wait = self.pool.soonest_return(time.time())
        if wait is None and not any(k.state == KeyState.ACTIVE for k in keys):
            return OpenAIError(
                503,
                f"No upstream API key is available{tried}: every key in the pool is invalid, exhausted or disabled,"
                " and only re-validation or an admin can bring one back.",
                "server_error",
                "no_upstream_key_available",
                {"x-should-retry": "false"},
            )
        retry_after = math.ceil(wait) if wait is not None else 1  # busy keys free up within the second
        return OpenAIError(
            503,
            f"No upstream API key is available right now{tried}: every key in the pool is cooling down,"
            " busy, exhausted, invalid or disabled. Retry after the Retry-After seconds.",
            "server_error",
            "no_upstream_key_available",
            {"retry-after": str(max(1, retry_after))},
        )

    # ------------------------------------------------------------------ state

    def persist(self, changes: list[StateChange], now: float) -> None:
        for change in changes:
            key = change.key
            log.info("upstream key #%d …%s is now %s (%s)", key.id, key.last4, change.state, change.reason or "ok")
            if self.states is not None:
                self.states.save_state(KeyStateChange(key.id, change.state, change.reason, change.cooldown_until, now))

    async def revalidate(
        self, client: httpx.AsyncClient, target: Upstream, default_base_url: str, keys: list[PoolKey] | None = None
    ) -> None:
        """Probe keys (default: the invalid and exhausted) with GET /v1/models; a pass makes one active."""
        if keys is None:
            keys = [k for k in self.pool.keys if k.state in REFUSED]
        for key in keys:
            outcome = await upstream.probe(client, target, default_base_url, key.value)
            now = time.time()
            if outcome.is_key_failure:
                continue
            self.persist(self.pool.learn(key, outcome, now, probe=True), now)
