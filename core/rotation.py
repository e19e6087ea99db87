"""Rotating keys over time: waiting for one, counting attempts, retrying, re-validating.

The pool (core/pool.py) knows which key is usable now; this module adds what a
request lives through: it waits up to `wait_max_seconds` for a key, records each
attempt, sends the request again with other keys when its key failed, and turns what
the pool learnt into state changes for storage. The key pool addon only converts
between mitmproxy's flows and these calls.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field

import httpx

from core import upstream
from core.classify import KEY_ONLY_FAILURES, Outcome, classify_response, connection_failure
from core.credentials import placeholder, with_credential
from core.errors import OpenAIError
from core.metadata import KeyUse
from core.models import REFUSED, KeyStateChange, PoolKey
from core.pool import Policy, Pool, StateChange
from core.ports import PoolStateSink
from core.records import AttemptLog

log = logging.getLogger(__name__)

PROOF_POLL_SECONDS = 0.02


@dataclass(frozen=True)
class RotationSettings:
    strategy: str = "round_robin"
    max_attempts: int = 3
    wait_max_seconds: float = 5
    policy: Policy = field(default_factory=Policy)


@dataclass(frozen=True)
class Outgoing:
    """A request as keyrotor sends it again: the client's, with another key put in."""

    method: str
    url: str
    fields: tuple[tuple[bytes, bytes], ...]
    body: bytes | None


@dataclass
class RetryResult:
    answer: upstream.Answer | None  # the last whole answer, None when no attempt got one
    refuse: bool  # every attempt failed because of our keys: answer with no_key_error instead


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

    def begin(self, use: KeyUse, key: PoolKey) -> None:
        now = time.time()
        use.probe = self.pool.started(key, now)
        use.key_id, use.key_last4 = key.id, key.last4
        use.attempts.append(AttemptLog(attempt=len(use.attempts) + 1, key_id=key.id, started_at=now))

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

    async def retry(
        self, client: httpx.AsyncClient, use: KeyUse, request: Outgoing, answered: Outcome | None
    ) -> RetryResult:
        """Send the request again with other keys until one answers well or attempts run out.

        `answered` is what the answer the client would get now said (None: no answer yet).
        """
        answer = None
        deadline = self.wait_deadline()
        while len(use.attempts) < self.settings.max_attempts:
            key = await self.acquire(use.tried_keys(), deadline)
            if key is None:
                break
            self.begin(use, key)
            try:
                answer = await upstream.send(
                    client, request.method, request.url, list(with_credential(request.fields, key.value)), request.body
                )
            except httpx.HTTPError as e:
                message = upstream.error_text(e)
                self.end(use, connection_failure(message), None, message)
                continue
            answer = answer.without_echo(key.value, placeholder(key.id, key.last4))
            answered = classify_response(
                answer.status, answer.headers, answer.content if answer.status >= 400 else None, time.time()
            )
            self.end(use, answered, answer.status, None)
            if answered is None or not answered.is_key_failure:
                break
        use.settled = True
        # Upstream's words about our key (its 401 even shows part of it) are not for the client.
        return RetryResult(answer, answered is not None and answered.kind in KEY_ONLY_FAILURES)

    def no_key_error(self, attempts: int) -> OpenAIError:
        wait = self.pool.soonest_return(time.time())
        retry_after = math.ceil(wait) if wait is not None else self.settings.policy.cooldown_seconds
        tried = f" after {attempts} attempt{'s' if attempts != 1 else ''} with different keys" if attempts else ""
        return OpenAIError(
            503,
            f"No upstream API key is available right now{tried}: every key in the pool is cooling down,"
            " exhausted, invalid or disabled. Retry after the Retry-After seconds.",
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

    async def revalidate(self, client: httpx.AsyncClient, base_url: str, keys: list[PoolKey] | None = None) -> None:
        """Probe keys (default: the invalid and exhausted) with GET /v1/models; a pass makes one active."""
        if keys is None:
            keys = [k for k in self.pool.keys if k.state in REFUSED]
        for key in keys:
            outcome = await upstream.probe(client, base_url, key.value)
            now = time.time()
            if outcome.is_key_failure:
                continue
            self.persist(self.pool.learn(key, outcome, now, probe=True), now)
