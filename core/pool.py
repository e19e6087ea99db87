"""The key pool's memory: which key is usable, which one goes next, and what each outcome does to it.

No proxy and no database here: the key pool addon feeds outcomes in and persists the
state changes that come out. Everything runs on the event loop, so no locks.

Breaker and rate-limit memory is kept per scope (`Health`): today every outcome is
learnt in the key-wide scope (None); a model name as scope keeps one model's faults
from resting the key for every other model.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from core.classify import Outcome, OutcomeKind
from core.models import KeyState, PoolKey

KEY_WIDE = None  # the scope of outcomes that are about the key as a whole

RECENT_HALF_LIFE = 60.0  # seconds: least_used's "recent" fades with this half-life


@dataclass(frozen=True)
class Policy:
    cooldown_seconds: float = 60
    max_cooldown_seconds: float = 3600
    failure_threshold: int = 3
    failure_cooldown_seconds: float = 30
    pool_429_window_seconds: float = 10


@dataclass
class Health:
    """A key's breaker and rate-limit memory in one scope (the whole key, or one model)."""

    failures: int = 0  # 5xx / connection errors in a row
    trips: int = 0  # circuit-breaker trips in a row: the backoff exponent
    rate_limits: int = 0  # 429s without a hint in a row: the backoff exponent
    last_429_at: float | None = None


@dataclass
class KeyRuntime:
    """What only the running proxy knows about a key; survives reloads of the key list."""

    in_flight: int = 0
    recent: float = 0.0  # picks, decayed with RECENT_HALF_LIFE
    recent_at: float = 0.0
    probing: bool = False  # a request after the cooldown is out; others wait for its answer
    proven: bool = False  # upstream has accepted the key since this process loaded it
    smooth_weight: float = 0.0  # smooth weighted round robin's running value
    scopes: dict[str | None, Health] = field(default_factory=dict)

    def health(self, scope: str | None = KEY_WIDE) -> Health:
        health = self.scopes.get(scope)
        if health is None:
            health = self.scopes[scope] = Health()
        return health


@dataclass(frozen=True)
class StateChange:
    key: PoolKey
    state: KeyState
    reason: str | None
    cooldown_until: float | None


@dataclass
class Pool:
    policy: Policy = field(default_factory=Policy)
    keys: list[PoolKey] = field(default_factory=list)
    by_id: dict[int, PoolKey] = field(default_factory=dict)
    runtime: dict[int, KeyRuntime] = field(default_factory=dict)
    pool_cooldown_until: float | None = None  # an upstream- or address-wide 429
    _cursor: int = 0
    _position: dict[int, int] = field(default_factory=dict)

    def replace_keys(self, keys: list[PoolKey]) -> None:
        """Take a fresh list from the database, keeping states learnt since it was written."""
        for key in keys:
            old = self.by_id.get(key.id)
            if old and (old.state_changed_at or 0) > (key.state_changed_at or 0):
                # Our own change is still in the writer's queue: the database is behind us.
                key.state, key.state_reason, key.cooldown_until = old.state, old.state_reason, old.cooldown_until
                key.state_changed_at = old.state_changed_at
        self.keys = keys
        self.by_id = {k.id: k for k in keys}
        self._position = {k.id: i for i, k in enumerate(keys)}
        self.runtime = {k.id: self.runtime.get(k.id) or KeyRuntime() for k in keys}

    # ------------------------------------------------------------------ choosing

    def is_usable(self, key: PoolKey, now: float, busy_ok: bool = False) -> bool:
        if key.state == KeyState.ACTIVE:
            # A key upstream has not yet accepted takes one request at a time: if it turns out
            # revoked, one request (retried elsewhere) finds out, not every concurrent one.
            rt = self.runtime[key.id]
            return rt.proven or rt.in_flight == 0 or busy_ok
        # A cooling key whose time is up takes one request, the probe, and waits for its answer.
        return key.state == KeyState.COOLING and (key.cooldown_until or 0) <= now and not self.runtime[key.id].probing

    def pick(
        self, strategy: str, now: float, exclude: frozenset[int] = frozenset(), busy_ok: bool = False
    ) -> PoolKey | None:
        """The next key, preferring keys not in `exclude` (those this request already tried).

        `busy_ok` also allows unproven keys that already have a request in flight.
        """
        if self.pool_cooldown_until and now < self.pool_cooldown_until:
            return None
        if strategy == "round_robin" and not exclude:
            return self._next_in_turn(now, busy_ok)  # the common case, without building lists
        usable = [k for k in self.keys if self.is_usable(k, now, busy_ok)]
        fresh = [k for k in usable if k.id not in exclude]
        candidates = fresh or usable
        if not candidates:
            return None
        if strategy == "random":
            key = random.choice(candidates)
        elif strategy == "least_used":
            key = min(candidates, key=lambda k: (self.runtime[k.id].in_flight, self._recent(k, now), self._order(k)))
        elif strategy == "weighted":
            key = self._smooth_weighted(candidates)
        else:
            key = min(candidates, key=self._order)
        self._cursor = self._position[key.id] + 1
        return key

    def _next_in_turn(self, now: float, busy_ok: bool) -> PoolKey | None:
        keys = self.keys
        for step in range(len(keys)):
            position = (self._cursor + step) % len(keys)
            if self.is_usable(keys[position], now, busy_ok):
                self._cursor = position + 1
                return keys[position]
        return None

    def _order(self, key: PoolKey) -> int:
        # Position after the last pick, so ties and round robin move on through the list.
        return (self._position[key.id] - self._cursor) % len(self.keys)

    def _recent(self, key: PoolKey, now: float) -> float:
        rt = self.runtime[key.id]
        return rt.recent * 0.5 ** ((now - rt.recent_at) / RECENT_HALF_LIFE)

    def _smooth_weighted(self, candidates: list[PoolKey]) -> PoolKey:
        # nginx's smooth weighted round robin: exact shares, and heavy keys spread out.
        weighted = [k for k in candidates if k.weight > 0] or candidates
        total = 0.0
        for key in weighted:
            rt = self.runtime[key.id]
            rt.smooth_weight += max(key.weight, 0.0) or 1.0
            total += max(key.weight, 0.0) or 1.0
        best = max(weighted, key=lambda k: self.runtime[k.id].smooth_weight)
        self.runtime[best.id].smooth_weight -= total
        return best

    def started(self, key: PoolKey, now: float) -> bool:
        """Count a request on `key`; True when it is the probe of a cooled key."""
        rt = self.runtime[key.id]
        rt.in_flight += 1
        rt.recent = self._recent(key, now) + 1
        rt.recent_at = now
        key.requests += 1
        probe = key.state == KeyState.COOLING
        if probe:
            rt.probing = True
        return probe

    def finished(self, key: PoolKey, probe_abandoned: bool = False) -> None:
        rt = self.runtime.get(key.id)
        if rt and rt.in_flight > 0:
            rt.in_flight -= 1
        if rt and probe_abandoned:
            rt.probing = False  # its answer will never come: the next request probes instead

    def awaiting_proof(self) -> bool:
        """Some active key is busy with its first request: its answer may free it soon."""
        return any(k.state == KeyState.ACTIVE and not self.runtime[k.id].proven for k in self.keys)

    def soonest_return(self, now: float) -> float | None:
        """Seconds until some key may be tried again, if waiting can help at all."""
        if self.pool_cooldown_until and now < self.pool_cooldown_until:
            return self.pool_cooldown_until - now
        ends = [k.cooldown_until or now for k in self.keys if k.state == KeyState.COOLING]
        return max(0.0, min(ends) - now) if ends else None

    # ------------------------------------------------------------------ learning

    def learn(
        self, key: PoolKey, outcome: Outcome | None, now: float, probe: bool, scope: str | None = KEY_WIDE
    ) -> list[StateChange]:
        """Apply one attempt's outcome (None: the request's own fault) and return what to persist."""
        rt = self.runtime.get(key.id)
        if rt is None or key.state == KeyState.DISABLED:
            return []  # deleted meanwhile, or an admin's decision, which outranks upstream
        if probe:
            rt.probing = False
        health = rt.health(scope)
        if outcome is None or outcome.kind in (OutcomeKind.OK, OutcomeKind.RATE_LIMITED):
            rt.proven = True  # upstream accepted the key, whatever it thought of the request
        if outcome is None or outcome.kind == OutcomeKind.OK:
            health.failures = health.trips = health.rate_limits = 0
            # Only a probe's answer proves a cooled key is back; a late answer to a request
            # sent before the 429 proves nothing.
            if key.state != KeyState.ACTIVE and probe:
                return [self._set(key, KeyState.ACTIVE, None, None, now)]
            return []
        if outcome.kind in (OutcomeKind.INVALID, OutcomeKind.EXHAUSTED):
            return [self._set(key, KeyState(outcome.kind), outcome.reason, None, now)]
        if outcome.kind == OutcomeKind.RATE_LIMITED:
            return self._rate_limited(key, health, outcome, now, scope)
        return self._failed(key, health, outcome, now, probe)

    def _rate_limited(
        self, key: PoolKey, health: Health, outcome: Outcome, now: float, scope: str | None
    ) -> list[StateChange]:
        wait = outcome.wait
        if wait is None:
            health.rate_limits += 1
            wait = self._backoff(self.policy.cooldown_seconds, health.rate_limits)
        health.last_429_at = now
        changes = [self._set(key, KeyState.COOLING, outcome.reason, now + wait, now)]
        if self._whole_pool_limited(now, scope):
            # Every usable key hit a limit at once: upstream limits our address or account,
            # not a key. Rest the pool once instead of marking each key.
            self.pool_cooldown_until = now + wait
            changes = [
                self._set(k, KeyState.ACTIVE, f"pool-wide {outcome.reason}", None, now)
                for k in self.keys
                if k.state == KeyState.COOLING and self.runtime[k.id].health(scope).last_429_at
            ]
            for k in self.keys:
                self.runtime[k.id].health(scope).last_429_at = None
        return changes

    def _whole_pool_limited(self, now: float, scope: str | None) -> bool:
        window = self.policy.pool_429_window_seconds
        eligible = [k for k in self.keys if k.state in (KeyState.ACTIVE, KeyState.COOLING)]
        if window <= 0 or len(eligible) < 2:
            return False  # with one key, "the pool" and "the key" are the same thing
        return all(
            (at := self.runtime[k.id].health(scope).last_429_at) is not None and now - at <= window for k in eligible
        )

    def _failed(self, key: PoolKey, health: Health, outcome: Outcome, now: float, probe: bool) -> list[StateChange]:
        health.failures += 1
        if health.failures < self.policy.failure_threshold and not probe:
            return []
        # Circuit breaker: open it, longer each time it trips again without a success between.
        health.failures = 0
        health.trips += 1
        until = now + self._backoff(self.policy.failure_cooldown_seconds, health.trips)
        return [self._set(key, KeyState.COOLING, f"circuit open: {outcome.reason}", until, now)]

    def _backoff(self, base: float, exponent: int) -> float:
        return min(self.policy.max_cooldown_seconds, base * 2 ** max(0, exponent - 1))

    def _set(self, key: PoolKey, state: KeyState, reason: str | None, until: float | None, now: float) -> StateChange:
        key.state, key.state_reason, key.cooldown_until, key.state_changed_at = state, reason, until, now
        return StateChange(key, state, reason, until)
