"""The key pool's memory: which key is usable, which one goes next, and what each outcome does to it.

No proxy and no database here: the key pool addon feeds outcomes in and persists the
state changes that come out. Everything runs on the event loop, so no locks.

Rate limits and breakers belong to a scope: the model a request asked for (OpenAI's
limits are per model), or the whole key (`KEY_WIDE`) for requests without one and for
what is about the key itself (invalid, out of quota). A key resting for one model
serves every other model; only key-wide rests are key states that storage keeps, the
others live in this process. When every key of a scope fails at once, the pool rests
for that scope (`Rest`) instead of marking any key: after a pool-wide 429 for as long
as upstream says (or a backoff that starts at a second), after upstream trouble with
one request at a time let through as a probe, so traffic returns as soon as upstream does.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from enum import StrEnum

from core.classify import Outcome, OutcomeKind
from core.models import KeyState, PoolKey

KEY_WIDE = None  # the scope of outcomes that are about the key as a whole

RECENT_HALF_LIFE = 60.0  # seconds: least_used's "recent" fades with this half-life
POOL_BACKOFF_SECONDS = 1.0  # a pool-wide rest without a hint from upstream starts here, doubling
# One client's requests may open the breakers of at most this share of a pool's keys within
# the window: whatever it sends, the others keep the rest of the pool.
CLIENT_SHARE = 0.5
CLIENT_SHARE_WINDOW_SECONDS = 60.0


class Probe(StrEnum):
    """Why an attempt is special: the one request let through to test a resting key or pool."""

    NONE = ""
    KEY = "key"  # the first request after a key's (or a key's scope's) cooldown
    POOL = "pool"  # the one request at a time let through while the pool rests after upstream trouble


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

    failures: int = 0  # requests in a row whose failure was this key's (each request counts once)
    trips: int = 0  # circuit-breaker trips in a row: the backoff exponent
    rate_limits: int = 0  # 429s without a hint in a row: the backoff exponent
    last_429_at: float | None = None
    resting_until: float | None = None  # a model scope's rest (a key-wide rest is the key's state)
    reason: str | None = None
    probing: bool = False


@dataclass
class Rest:
    """The whole pool in one scope: counting upstream trouble, and resting when it trips."""

    until: float = 0.0
    reason: str = ""
    trips: int = 0  # rests in a row without a success between: the backoff exponent
    failures: int = 0  # requests in a row that failed on more than one key, or with no key to compare
    clients: set[int] = field(default_factory=set)  # whose requests those were: each client counts once
    probes: bool = False  # upstream trouble lets one request at a time through; a pool-wide 429 does not
    probing: bool = False

    def active(self, now: float) -> bool:
        return now < self.until


@dataclass
class KeyRuntime:
    """What only the running proxy knows about a key; survives reloads of the key list."""

    in_flight: int = 0
    elsewhere: int = 0  # with workers: this key's requests in flight in the other workers (POLL_SECONDS old)
    recent: float = 0.0  # picks, decayed with RECENT_HALF_LIFE
    recent_at: float = 0.0
    probing: bool = False  # a request after the cooldown is out; others wait for its answer
    proven: bool = False  # upstream has accepted the key since this process loaded it
    smooth_weight: float = 0.0  # smooth weighted round robin's running value
    scopes: dict[str | None, Health] = field(default_factory=dict)  # only scopes with something to remember

    def health(self, scope: str | None = KEY_WIDE) -> Health:
        health = self.scopes.get(scope)
        if health is None:
            health = self.scopes[scope] = Health()
        return health


@dataclass(frozen=True)
class Rested:
    """A rest this pool began or ended, told to the other workers on the same storage (docs/workers.md)."""

    scope: str | None
    key_id: int | None  # None: the whole pool rests (or stops resting) for the scope
    until: float  # 0: it ended (a probe got through)
    reason: str = ""
    probes: bool = False  # a pool rest that lets one request at a time through
    probing: bool = False  # a pool rest whose probe is out, in the worker that sent it


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
    rests: dict[str | None, Rest] = field(default_factory=dict)  # by scope
    scoped_until: float = 0.0  # the latest end of any model scope's rest: before it, picks need the model
    shared: list[Rested] | None = None  # with workers: the rests to tell the others (None: one process)
    _cursor: int = 0
    _position: dict[int, int] = field(default_factory=dict)
    _rested_by: dict[int, list[tuple[float, int]]] = field(default_factory=dict)  # client → (when, key id)

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

    def is_usable(self, key: PoolKey, now: float, busy_ok: bool = False, scope: str | None = KEY_WIDE) -> bool:
        rt = self.runtime[key.id]
        if rt.scopes and scope is not KEY_WIDE and not self._scope_usable(rt.scopes.get(scope), now):
            return False
        if key.state == KeyState.ACTIVE:
            # A key upstream has not yet accepted takes one request at a time: if it turns out
            # revoked, one request (retried elsewhere) finds out, not every concurrent one.
            return rt.proven or rt.in_flight == 0 or busy_ok
        # A cooling key whose time is up takes one request, the probe, and waits for its answer.
        return key.state == KeyState.COOLING and (key.cooldown_until or 0) <= now and not rt.probing

    @staticmethod
    def _scope_usable(health: Health | None, now: float) -> bool:
        if health is None or health.resting_until is None:
            return True
        return health.resting_until <= now and not health.probing

    def resting(self, scope: str | None, now: float) -> Rest | None:
        """The pool's rest for `scope`, while it lasts."""
        rest = self.rests.get(scope) if self.rests else None
        return rest if rest is not None and rest.active(now) else None

    def pick(
        self,
        strategy: str,
        now: float,
        exclude: frozenset[int] = frozenset(),
        busy_ok: bool = False,
        scope: str | None = KEY_WIDE,
        only: int | None = None,
    ) -> PoolKey | None:
        """The next key, never one in `exclude` (those that failed this request) while another
        key could still serve; `busy_ok` also allows unproven keys that already have a request
        in flight. `only`: that key or none (the owner of an object the request names)."""
        rest = self.resting(scope, now)
        if rest is not None and (not rest.probes or rest.probing):
            return None
        if only is not None:
            key = self.by_id.get(only)
            return key if key is not None and self.is_usable(key, now, busy_ok, scope) else None
        if strategy == "round_robin" and not exclude:
            return self._next_in_turn(now, busy_ok, scope)  # the common case, without building lists
        usable = [k for k in self.keys if self.is_usable(k, now, busy_ok, scope)]
        candidates = [k for k in usable if k.id not in exclude]
        if not candidates and not self._others_may_serve(exclude):
            candidates = usable  # nothing else can ever serve: the same key once more
        if not candidates:
            return None
        if strategy == "random":
            key = random.choice(candidates)
        elif strategy == "least_used":
            key = min(candidates, key=lambda k: (self._busy(k), self._recent(k, now), self._order(k)))
        elif strategy == "weighted":
            key = self._smooth_weighted(candidates)
        else:
            key = min(candidates, key=self._order)
        self._cursor = self._position[key.id] + 1
        return key

    def _others_may_serve(self, exclude: frozenset[int]) -> bool:
        return any(k.id not in exclude and k.state in (KeyState.ACTIVE, KeyState.COOLING) for k in self.keys)

    def _next_in_turn(self, now: float, busy_ok: bool, scope: str | None) -> PoolKey | None:
        keys = self.keys
        for step in range(len(keys)):
            position = (self._cursor + step) % len(keys)
            if self.is_usable(keys[position], now, busy_ok, scope):
                self._cursor = position + 1
                return keys[position]
        return None

    def _busy(self, key: PoolKey) -> int:
        rt = self.runtime[key.id]
        return rt.in_flight + rt.elsewhere

    def _order(self, key: PoolKey) -> int:
        # Position after the last pick, so ties and round robin move on through the list.
        return (self._position[key.id] - self._cursor) % len(self.keys)

    def _recent(self, key: PoolKey, now: float) -> float:
        rt = self.runtime[key.id]
        decay: float = 0.5 ** ((now - rt.recent_at) / RECENT_HALF_LIFE)  # float ** float is Any to typeshed
        return rt.recent * decay

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

    def started(self, key: PoolKey, now: float, scope: str | None = KEY_WIDE) -> Probe:
        """Count a request on `key`, and say whether it is a probe (of a rested key, or of the pool)."""
        rt = self.runtime[key.id]
        rt.in_flight += 1
        rt.recent = self._recent(key, now) + 1
        rt.recent_at = now
        key.requests += 1
        rest = self.resting(scope, now)
        if rest is not None:
            rest.probing = True
            if self.shared is not None:
                self.shared.append(Rested(scope, None, rest.until, rest.reason, rest.probes, probing=True))
            return Probe.POOL
        health = rt.scopes.get(scope) if rt.scopes and scope is not KEY_WIDE else None
        if key.state == KeyState.COOLING:
            rt.probing = True
            return Probe.KEY
        if health is not None and health.resting_until is not None:
            health.probing = True
            return Probe.KEY
        return Probe.NONE

    def finished(
        self, key: PoolKey, probe: Probe = Probe.NONE, scope: str | None = KEY_WIDE, abandoned: bool = False
    ) -> None:
        rt = self.runtime.get(key.id)
        if rt and rt.in_flight > 0:
            rt.in_flight -= 1
        if rt and abandoned:
            self._probe_over(rt, probe, scope)  # its answer will never come: the next request probes instead

    def _probe_over(self, rt: KeyRuntime, probe: Probe, scope: str | None) -> None:
        if probe == Probe.POOL and (rest := self.rests.get(scope)) is not None:
            rest.probing = False
        elif probe == Probe.KEY:
            rt.probing = False
            if (health := rt.scopes.get(scope)) is not None:
                health.probing = False

    def rests_in(self, key: PoolKey, scope: str | None, now: float) -> bool:
        """The key rests for `scope` (a model's rest, while the key itself stays active)."""
        if scope is KEY_WIDE:
            return False
        scopes = self.runtime[key.id].scopes
        return bool(scopes) and not self._scope_usable(scopes.get(scope), now)

    def awaiting_proof(
        self, exclude: frozenset[int] = frozenset(), scope: str | None = KEY_WIDE, now: float = 0.0
    ) -> bool:
        """Some active key is busy with its first request: its answer may free it soon. A key resting
        for `scope` is not awaited: its answer would not free it for this request."""
        return any(
            k.state == KeyState.ACTIVE
            and not self.runtime[k.id].proven
            and k.id not in exclude
            and not self.rests_in(k, scope, now)
            for k in self.keys
        )

    def soonest_return(
        self, now: float, scope: str | None = KEY_WIDE, exclude: frozenset[int] = frozenset()
    ) -> float | None:
        """Seconds until some key may be tried again, if waiting can help at all."""
        rest = self.resting(scope, now)
        if rest is not None:
            return rest.until - now
        ends = []
        for key in self.keys:
            if key.id in exclude or key.state not in (KeyState.ACTIVE, KeyState.COOLING):
                continue
            rt = self.runtime[key.id]
            health = rt.scopes.get(scope) if scope is not KEY_WIDE else None
            scope_end = health.resting_until if health is not None and health.resting_until else None
            key_end = (key.cooldown_until or now) if key.state == KeyState.COOLING else None
            if scope_end is not None or key_end is not None:
                ends.append(max(scope_end or now, key_end or now))
        return max(0.0, min(ends) - now) if ends else None

    # ------------------------------------------------------------------ learning

    def learn(
        self,
        key: PoolKey,
        outcome: Outcome | None,
        now: float,
        probe: Probe | bool = Probe.NONE,
        scope: str | None = KEY_WIDE,
        client: int | None = None,
    ) -> list[StateChange]:
        """Apply one attempt's outcome (None: the request's own fault) and return what to persist.

        Failures given here are the key's: the caller (core/rotation.py) hands what followed a
        request from key to key to `upstream_trouble` instead. `client` caused the attempt.
        """
        probe = Probe.KEY if probe is True else Probe(probe or Probe.NONE)
        rt = self.runtime.get(key.id)
        if rt is None or key.state == KeyState.DISABLED:
            return []  # deleted meanwhile, or an admin's decision, which outranks upstream
        self._probe_over(rt, probe, scope)
        if outcome is None or outcome.kind in (OutcomeKind.OK, OutcomeKind.RATE_LIMITED):
            rt.proven = True  # upstream accepted the key, whatever it thought of the request
        if outcome is None or outcome.kind == OutcomeKind.OK:
            return self._succeeded(key, rt, now, probe, scope)
        if outcome.kind in (OutcomeKind.INVALID, OutcomeKind.EXHAUSTED):
            return [self._set(key, KeyState(outcome.kind), outcome.reason, None, now)]
        if outcome.kind == OutcomeKind.RATE_LIMITED:
            return self._rate_limited(key, rt, outcome, now, scope)
        return self._failed(key, rt, outcome, now, probe, scope, client)

    def _succeeded(
        self, key: PoolKey, rt: KeyRuntime, now: float, probe: Probe, scope: str | None
    ) -> list[StateChange]:
        health = rt.scopes.get(scope) if rt.scopes else None
        if health is not None:
            if probe == Probe.NONE and health.resting_until is not None and health.resting_until > now:
                health.failures = health.rate_limits = 0  # a late answer to a request sent before the rest
            else:
                del rt.scopes[scope]
                if health.resting_until is not None and self.shared is not None:
                    self.shared.append(Rested(scope, key.id, 0.0))
                if health.resting_until is not None and key.state == KeyState.ACTIVE and key.state_reason:
                    return [self._set(key, KeyState.ACTIVE, None, None, now)]  # back for this model too
        rest = self.rests.get(scope) if self.rests else None
        if rest is not None and (probe == Probe.POOL or not rest.active(now)):
            del self.rests[scope]  # upstream is back for this scope
            if probe == Probe.POOL and self.shared is not None:
                self.shared.append(Rested(scope, None, 0.0))
        # Only a probe's answer proves a cooled key is back; a late answer to a request sent
        # before the 429 proves nothing.
        if key.state != KeyState.ACTIVE and probe != Probe.NONE:
            return [self._set(key, KeyState.ACTIVE, None, None, now)]
        return []

    def _rate_limited(
        self, key: PoolKey, rt: KeyRuntime, outcome: Outcome, now: float, scope: str | None
    ) -> list[StateChange]:
        health = rt.health(scope)
        wait = outcome.wait
        if wait is None:
            health.rate_limits += 1
            wait = self._backoff(self.policy.cooldown_seconds, health.rate_limits)
        health.last_429_at = now
        if self._whole_pool_limited(now, scope):
            return self._rest_pool_for_429(outcome, now, scope)
        # No share limit here: upstream said in so many words that this key is limited, and the
        # limit binds every client alike (a request too large for any key is not a 429 here).
        return self._rest_key(key, health, scope, now + wait, outcome.reason, now)

    def _rest_pool_for_429(self, outcome: Outcome, now: float, scope: str | None) -> list[StateChange]:
        # Every usable key hit a limit at once: upstream limits our address, account or this
        # model, not a key. Rest the pool once, as long as upstream says or briefly, and mark no key.
        rest = self.rests.setdefault(scope, Rest())
        rest.trips += 1
        wait = outcome.wait if outcome.wait is not None else self._backoff(POOL_BACKOFF_SECONDS, rest.trips)
        rest.until, rest.reason, rest.probes, rest.probing = now + wait, f"pool-wide {outcome.reason}", False, False
        self._note_scoped(scope, rest.until)
        if self.shared is not None:
            self.shared.append(Rested(scope, None, rest.until, rest.reason))
        changes = []
        for k in self.keys:
            health = self.runtime[k.id].scopes.get(scope)
            if health is None or health.last_429_at is None:
                continue
            health.last_429_at = None
            health.rate_limits = 0
            if scope is KEY_WIDE and k.state == KeyState.COOLING:
                changes.append(self._set(k, KeyState.ACTIVE, f"pool-wide {outcome.reason}", None, now))
            health.resting_until = None
        return changes

    def _whole_pool_limited(self, now: float, scope: str | None) -> bool:
        window = self.policy.pool_429_window_seconds
        eligible = [k for k in self.keys if k.state in (KeyState.ACTIVE, KeyState.COOLING)]
        if window <= 0 or len(eligible) < 2:
            return False  # with one key, "the pool" and "the key" are the same thing
        for key in eligible:
            health = self.runtime[key.id].scopes.get(scope)
            if health is None or health.last_429_at is None or now - health.last_429_at > window:
                return False
        return True

    def _failed(
        self,
        key: PoolKey,
        rt: KeyRuntime,
        outcome: Outcome,
        now: float,
        probe: Probe,
        scope: str | None,
        client: int | None,
    ) -> list[StateChange]:
        health = rt.health(scope)
        health.failures += 1
        if health.failures < self.policy.failure_threshold and probe != Probe.KEY:
            return []
        # Circuit breaker: open it, longer each time it trips again without a success between.
        health.failures = 0
        health.trips += 1
        if not self._client_may_rest(client, key, now):
            return []
        until = now + self._backoff(self.policy.failure_cooldown_seconds, health.trips)
        return self._rest_key(key, health, scope, until, f"circuit open: {outcome.reason}", now)

    def upstream_trouble(
        self,
        scope: str | None,
        now: float,
        reason: str | None,
        probe: Probe = Probe.NONE,
        client: int | None = None,
    ) -> None:
        """A request failed in a way that is no key's own: on two keys, or with no other key to
        compare. Such failures in a row, from requests of distinct clients (one client's requests
        that fail everywhere may be its own doing), rest the pool for the scope with one request
        at a time let through as a probe."""
        rest = self.rests.setdefault(scope, Rest())
        if probe == Probe.POOL:
            rest.probing = False
            if self.shared is not None and rest.active(now):  # the probe failed: another may go
                self.shared.append(Rested(scope, None, rest.until, rest.reason, rest.probes))
        if rest.active(now) or (client is not None and client in rest.clients):
            return
        if client is not None:
            rest.clients.add(client)
        rest.failures += 1
        if rest.failures < self.policy.failure_threshold:
            return
        rest.failures = 0
        rest.clients.clear()
        rest.trips += 1
        wait = min(self.policy.failure_cooldown_seconds, self._backoff(POOL_BACKOFF_SECONDS, rest.trips))
        rest.until, rest.reason, rest.probes, rest.probing = now + wait, f"upstream trouble: {reason}", True, False
        self._note_scoped(scope, rest.until)
        if self.shared is not None:
            self.shared.append(Rested(scope, None, rest.until, rest.reason, True))

    def _client_may_rest(self, client: int | None, key: PoolKey, now: float) -> bool:
        """Whether `client`'s request may put `key` to rest: at most CLIENT_SHARE of the pool a window."""
        if client is None:
            return True
        recent = [(at, k) for at, k in self._rested_by.get(client, ()) if now - at <= CLIENT_SHARE_WINDOW_SECONDS]
        rested = {k for _, k in recent}
        if key.id not in rested and len(rested) >= max(1, int(len(self.keys) * CLIENT_SHARE)):
            self._rested_by[client] = recent
            return False
        recent.append((now, key.id))
        self._rested_by[client] = recent
        return True

    def _rest_key(
        self, key: PoolKey, health: Health, scope: str | None, until: float, reason: str | None, now: float
    ) -> list[StateChange]:
        if scope is KEY_WIDE:
            return [self._set(key, KeyState.COOLING, reason, until, now)]
        health.resting_until, health.reason, health.probing = until, reason, False
        self._note_scoped(scope, until)
        if self.shared is not None:
            self.shared.append(Rested(scope, key.id, until, reason or ""))
        # The key stays active for every other model; its reason tells the keys page why it skips this one.
        return [self._set(key, key.state, f"{reason} ({scope})", key.cooldown_until, now)]

    def absorb(self, rested: Rested, now: float) -> None:
        """A rest another worker began or ended: this pool rests (or stops resting) the same way."""
        if rested.key_id is None:
            if not rested.until:
                self.rests.pop(rested.scope, None)
                return
            rest = self.rests.setdefault(rested.scope, Rest())
            rest.until, rest.reason, rest.probes = rested.until, rested.reason, rested.probes
            rest.probing = rested.probing  # its probe is out: this worker sends none meanwhile
            self._note_scoped(rested.scope, rested.until)
            return
        rt = self.runtime.get(rested.key_id)
        if rt is None or rested.scope is KEY_WIDE:
            return  # a key deleted meanwhile; key-wide rests are key states, shared as such
        if not rested.until:
            rt.scopes.pop(rested.scope, None)
            return
        health = rt.health(rested.scope)
        health.resting_until, health.reason, health.probing = rested.until, rested.reason, False
        self._note_scoped(rested.scope, rested.until)

    def _note_scoped(self, scope: str | None, until: float) -> None:
        if scope is not KEY_WIDE:
            self.scoped_until = max(self.scoped_until, until)

    def _backoff(self, base: float, exponent: int) -> float:
        return min(self.policy.max_cooldown_seconds, base * 2.0 ** max(0, exponent - 1))

    def _set(self, key: PoolKey, state: KeyState, reason: str | None, until: float | None, now: float) -> StateChange:
        key.state, key.state_reason, key.cooldown_until, key.state_changed_at = state, reason, until, now
        return StateChange(key, state, reason, until)
