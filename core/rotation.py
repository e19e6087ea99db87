"""Rotating keys over time: waiting for one, counting attempts, retrying, re-validating.

One Rotation per upstream group. The pool (core/pool.py) knows which key is usable
now; this adds what a request lives through in that group: it waits up to
`wait_max_seconds` for a key, records each attempt, and turns what the pool learnt
into state changes for storage. core/dispatch.py decides how a request moves across
keys, groups and fallback models; core/failover.py carries it out.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from core import upstream
from core.classify import UPSTREAM_TROUBLE, Outcome, OutcomeKind, connection_failure
from core.errors import OpenAIError
from core.metadata import KeyUse
from core.models import REFUSED, KeyState, KeyStateChange, PoolKey
from core.pool import KEY_WIDE, Policy, Pool, Probe, StateChange
from core.ports import PoolStateSink, RestSink
from core.records import AttemptLog
from core.routing import Candidate, Upstream

log = logging.getLogger(__name__)

PROOF_POLL_SECONDS = 0.02
PROBE_POLL_SECONDS = 0.05  # while the pool rests with a probe out, waiting requests look this often


@dataclass(frozen=True)
class KeyWait:
    """What a request does when no key is free: wait `seconds` and look again, or take `key` (None: give up)."""

    key: PoolKey | None = None
    seconds: float | None = None


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
        self.group_id: int | None = None  # set by core/state.py; names the pool in what other workers are told
        self.rests: RestSink | None = None  # with workers: where the pool's rests go (pool.shared is then a list)
        # Azure deployments the group's upstream said do not exist (DeploymentNotFound): its routes
        # for them are skipped while another route serves the model, until the routes change
        # (core/state.py clears this).
        self.missing: set[str] = set()
        self.label = ""  # the group's UPSTREAM/GROUP, for the console (core/state.py names it)
        self._usable: bool | None = None  # whether a key may serve now or after its cooldown, as last said

    def announce_usable(self, serving: bool = True) -> None:
        """One console line when the group is left with no key that can serve (only invalid, exhausted or
        disabled ones, or none), and one when it has one again; nothing while that stays the same, nor
        while the group (or its upstream) is disabled: `serving` False."""
        if not serving:
            self._usable = None
            return
        keys = self.pool.keys
        usable = any(k.state in (KeyState.ACTIVE, KeyState.COOLING) for k in keys)
        if usable == self._usable or (usable and self._usable is None):
            self._usable = usable
            return
        self._usable = usable
        if usable:
            log.info("group %s has a usable upstream key again", self.label)
        elif not keys:
            log.warning("group %s has no upstream key: its models are served by other groups, or refused", self.label)
        else:
            states = ", ".join(
                f"{sum(k.state == s for k in keys)} {s}" for s in KeyState if any(k.state == s for k in keys)
            )
            log.warning(
                "group %s has no usable upstream key (%s): its models are served by other groups, or refused,"
                " until re-validation or an admin brings one back",
                self.label,
                states,
            )

    def configure(self, settings: RotationSettings) -> None:
        self.settings = settings
        self.pool.policy = settings.policy

    # ------------------------------------------------------------------ keys

    def pick_now(self, scope: str | None = KEY_WIDE, only: int | None = None) -> PoolKey | None:
        return self.pool.pick(self.settings.strategy, time.time(), scope=scope, only=only)

    def release(self, use: KeyUse, error: str) -> None:
        """End the latest attempt without learning from it: the client went away first."""
        attempt = use.attempts[-1]
        attempt.error = error
        attempt.duration_ms = round((time.time() - attempt.started_at) * 1000, 3)
        key = self.pool.by_id.get(use.key_id) if use.key_id is not None else None
        if key is not None:
            self.pool.finished(key, Probe(use.probe), use.scope, abandoned=True)

    async def acquire(
        self,
        exclude: frozenset[int],
        deadline: float,
        scope: str | None = KEY_WIDE,
        alive: Callable[[], bool] | None = None,
        only: int | None = None,
    ) -> PoolKey | None:
        """A usable key not in `exclude`, waiting until `deadline` for one to come back;
        `only`: that key (tried again even after it failed), waiting for it alone."""
        strategy = self.settings.strategy
        pool = self.pool
        if only is not None:
            exclude = frozenset(pool.by_id) - {only}  # what the waits below look at
        while True:
            now = time.time()
            key = pool.pick(strategy, now, exclude, scope=scope, only=only)
            if key is not None:
                return key
            if alive is not None and not alive():
                return None  # nobody is waiting for the answer any more
            then = self.waiting(exclude, deadline, scope, only, now, strategy)
            if then.seconds is None:
                return then.key
            await asyncio.sleep(then.seconds)

    def waiting(
        self,
        exclude: frozenset[int],
        deadline: float,
        scope: str | None,
        only: int | None,
        now: float,
        strategy: str | None = None,
    ) -> KeyWait:
        """No key is free now: whether to wait for one to come back (how long before looking again),
        to share one that awaits its first answer, or to give up."""
        pool = self.pool
        if pool.awaiting_proof(exclude, scope, now):
            if now + PROOF_POLL_SECONDS > deadline:
                # No time to wait for a new key's first answer: share it rather than fail.
                strategy = strategy or self.settings.strategy
                return KeyWait(pool.pick(strategy, now, exclude, busy_ok=True, scope=scope, only=only))
            return KeyWait(seconds=PROOF_POLL_SECONDS)
        rest = pool.resting(scope, now)
        if rest is not None and rest.probes:
            # A probe's answer may end the pool's rest at any moment: look again soon.
            return KeyWait() if now >= deadline else KeyWait(seconds=min(PROBE_POLL_SECONDS, deadline - now))
        wait = pool.soonest_return(now, scope, exclude)
        if wait is None or now + wait > deadline:
            return KeyWait()
        return KeyWait(seconds=max(wait, PROOF_POLL_SECONDS))  # a probe in flight ends the wait early or late

    def wait_deadline(self) -> float:
        return time.time() + self.settings.wait_max_seconds

    # ------------------------------------------------------------------ attempts

    def begin(
        self,
        use: KeyUse,
        key: PoolKey,
        route: Candidate | None = None,
        model: str | None = None,
        scope: str | None = KEY_WIDE,
        scope_known: bool = True,
    ) -> None:
        """Count an attempt with `key`; `route` says where it goes, `model` is set for a fallback,
        `scope` is the model whose limits the attempt counts against."""
        now = time.time()
        use.probe = self.pool.started(key, now, scope)
        if self.pool.shared:
            self.share()  # a probe of the resting pool went out: the other workers send none meanwhile
        use.scope, use.scope_known = scope, scope_known
        use.key_id, use.key_last4 = key.id, key.last4
        attempt = AttemptLog(attempt=len(use.attempts) + 1, key_id=key.id, started_at=now, model=model)
        if route is not None:
            use.group_id = attempt.group_id = route.group.id
            use.upstream_id = attempt.upstream_id = route.group.upstream.id
        use.attempts.append(attempt)

    def needs_scope(self, use: KeyUse, outcome: Outcome | None) -> bool:
        """Whether learning from this attempt needs to know its model (read from the body on demand)."""
        if use.scope_known:
            return False
        if outcome is not None and outcome.kind != OutcomeKind.OK:
            return True
        rt = self.pool.runtime.get(use.key_id) if use.key_id is not None else None
        return bool(self.pool.rests or (rt is not None and rt.scopes))

    def end(self, use: KeyUse, outcome: Outcome | None, status: int | None, error: str | None) -> None:
        self._end(use, outcome, status, error)
        if self.pool.shared:
            self.share()

    def _end(self, use: KeyUse, outcome: Outcome | None, status: int | None, error: str | None) -> None:
        """Close the latest attempt and learn from it.

        A 5xx or a lost answer may be the key's fault or the request's (or upstream's): it is
        held as the request's suspect until another key of the group answers the same request
        (then it was the key's) or fails it the same way (then it follows the request, and no
        key is marked). Only a proven suspect (upstream has accepted the key since the start)
        lets a failure follow the request: an unproven one is blamed, and the new failure is the
        suspect. What is still unresolved when the request leaves the group is upstream's
        (`settle`). Each request counts at most once against a key.
        """
        now = time.time()
        attempt = use.attempts[-1]
        attempt.status, attempt.error = status, error
        attempt.duration_ms = round((now - attempt.started_at) * 1000, 3)
        use.outcome = outcome.kind if outcome else None
        key = self.pool.by_id.get(use.key_id) if use.key_id is not None else None
        if key is None:
            return  # deleted by an admin while the request ran
        probe, scope = Probe(use.probe), use.scope
        self.pool.finished(key)
        if outcome is not None and outcome.kind in UPSTREAM_TROUBLE:
            if probe == Probe.POOL:
                self.pool.upstream_trouble(scope, now, outcome.reason, probe, use.client_id)
                return
            if probe == Probe.NONE:
                earlier = self._suspect(use)
                if earlier is None:
                    use.suspect = attempt.attempt
                elif earlier.key_id != key.id and not self._proven(earlier.key_id):
                    # A key upstream has not accepted yet failed first: that key is blamed, and
                    # this one is the suspect now (the request goes on to a key not yet tried).
                    self._blame_suspect(use, now)
                    use.suspect = attempt.attempt
                elif earlier.key_id != key.id:
                    use.suspect = None  # it followed the request to another key
                    self.pool.upstream_trouble(scope, now, outcome.reason, client=use.client_id)
                return
        elif use.suspect is not None and (outcome is None or outcome.kind == OutcomeKind.OK):
            self._blame_suspect(use, now)
        self.persist(self.pool.learn(key, outcome, now, probe, scope, use.client_id), now)

    def settle(self, use: KeyUse) -> None:
        """The request leaves this group: a failure no other key could confirm is upstream's."""
        earlier = self._suspect(use)
        if earlier is None:
            return
        use.suspect = None
        reason = f"{earlier.status} server_error" if earlier.status is not None else earlier.error
        self.pool.upstream_trouble(use.scope, time.time(), reason, client=use.client_id)
        if self.pool.shared:
            self.share()

    def share(self) -> None:
        """Tell the other workers the rests this pool began or ended (only with workers: pool.shared is a list)."""
        shared = self.pool.shared
        if not shared:
            return
        rests = shared[:]
        shared.clear()
        if self.rests is not None and self.group_id is not None:
            self.rests.save_rests(self.group_id, rests)

    def _suspect(self, use: KeyUse) -> AttemptLog | None:
        if use.suspect is None or use.suspect > len(use.attempts):
            return None
        attempt = use.attempts[use.suspect - 1]
        return attempt if attempt.key_id in self.pool.by_id else None

    def _proven(self, key_id: int) -> bool:
        runtime = self.pool.runtime.get(key_id)
        return runtime is None or runtime.proven

    def _blame_suspect(self, use: KeyUse, now: float) -> None:
        """Another key answered the request that `use.suspect` failed: that key was at fault."""
        earlier = self._suspect(use)
        use.suspect = None
        if earlier is None:
            return
        key = self.pool.by_id[earlier.key_id]
        if earlier.status is None:
            outcome = connection_failure(earlier.error or "no answer")
        else:
            outcome = Outcome(OutcomeKind.SERVER_ERROR, f"{earlier.status} server_error")
        self.persist(self.pool.learn(key, outcome, now, Probe.NONE, use.scope, use.client_id), now)

    def no_key_error(self, attempts: int, scope: str | None = KEY_WIDE) -> OpenAIError:
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
        now = time.time()
        wait = self.pool.soonest_return(now, scope)
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
        rest = self.pool.resting(scope, now)
        why = f" The pool is resting{f' for {scope}' if scope else ''} ({rest.reason})." if rest else ""
        return OpenAIError(
            503,
            f"No upstream API key is available right now{tried}: every key in the pool is cooling down,"
            f" busy, exhausted, invalid or disabled.{why} Retry after the Retry-After seconds.",
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
        if changes:
            self.announce_usable()

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
            self.persist(self.pool.learn(key, outcome, now, Probe.KEY), now)
