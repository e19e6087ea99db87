"""One request's journey, from plan to end, as decisions: no proxy, no network, no waiting.

    plan the candidates → pick the first key → classify the attempt's outcome →
    answer | retry on another key | wait for one to come back | the next group or fallback
    model | refuse (with which error) → rename the model back

The first attempt goes through mitmproxy (so a good answer streams unbuffered); when it
fails for its key, or its group has no such model, and nothing reached the client yet,
the request is sent again elsewhere. addons/keypool.py applies these decisions to the
flow; core/failover.py carries them out (it waits for keys and sends the retries). The
pools' memory (core/rotation.py, core/pool.py) is read and taught in memory only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import NamedTuple

from core import affinity
from core.classify import (
    KEY_ONLY_FAILURES,
    OK,
    HeaderLookup,
    Outcome,
    OutcomeKind,
    classify_response,
    is_client_side,
    is_context_too_long,
    is_model_missing,
)
from core.credentials import AUTHORIZATION
from core.dialects import API_KEY, upstream_url, with_key
from core.errors import OpenAIError
from core.metadata import AccessVerdict, KeyUse
from core.models import REFUSED, KeyState, PoolKey
from core.records import AttemptLog
from core.request_model import renamed_top_model
from core.rotation import Rotation, RotationSettings
from core.routing import Candidate, Dialect, Group, RouteTable, renamed_model

CREDENTIAL_HEADERS = (AUTHORIZATION, API_KEY)
# Keys of one group on which a request met 5xx or connection errors before it tries the next group.
GROUP_FAILURES = 2
# Rate-limited attempts beyond max_attempts a request may make while it waits within wait_max_seconds.
MAX_RATE_LIMITED_ATTEMPTS = 10


@dataclass(frozen=True)
class ClientRequest:
    """The request as the client sent it (its credential already replaced by a placeholder)."""

    method: str
    path: str  # with the query
    fields: tuple[tuple[bytes, bytes], ...]
    body: bytes | None
    model: str | None  # what the client asked for


@dataclass(frozen=True)
class Outgoing:
    method: str
    url: str
    fields: tuple[tuple[bytes, bytes], ...]
    body: bytes | None


@dataclass
class Plan:
    """Where one request may go, in order (core.routing.RouteTable.candidates)."""

    candidates: list[Candidate]
    request: ClientRequest
    body_model: str | None = None  # the model named in the body as the first attempt sent it
    only_key: int | None = None  # the key that owns an object the request names: no other may serve it

    def candidate(self, use: KeyUse) -> Candidate:
        return self.candidates[use.candidate]

    def renamed_first(self, candidate: Candidate) -> str | None:
        """The model the first attempt on `candidate` names in its body instead of the client's (the
        upstream's own name for it), None to send it as asked; the retries start from what it sent."""
        asked = self.request.model
        to = candidate.upstream_model
        rename = bool(asked) and to != asked and candidate.group.upstream.dialect == Dialect.OPENAI
        self.body_model = to if rename else asked
        return to if rename else None

    def fallback_after(self, index: int) -> bool:
        """Whether a route after `index` serves another model (a fallback) than route `index` does."""
        if index >= len(self.candidates):
            return False
        model = self.candidates[index].model
        return any(c.model != model for c in self.candidates[index + 1 :])

    def answering(self, use: KeyUse | None) -> Candidate | None:
        """The route of the latest attempt, if the request has one."""
        if use is None or use.candidate >= len(self.candidates):
            return None
        return self.candidates[use.candidate]


Fields = tuple[tuple[bytes, bytes], ...]


def planned(
    candidates: list[Candidate], method: str, path: str, fields: Fields, model: str | None, only_key: int | None = None
) -> Plan:
    """The plan of a request: its routes, and the request with only its credential kept (a placeholder by now)."""
    credential = tuple((n, v) for n, v in fields if n.lower() in CREDENTIAL_HEADERS)
    return Plan(candidates, ClientRequest(method, path, credential, None, model), only_key=only_key)


def to_resend(request: ClientRequest, method: str, fields: Fields, body: bytes | None) -> ClientRequest:
    """The request to send again: its body and headers as they are now (the usage addon may have asked
    for usage), with the client's own credential layout (an Azure attempt moved it into api-key)."""
    kept = tuple((n, v) for n, v in fields if n.lower() not in CREDENTIAL_HEADERS)
    credential = request.fields or ((AUTHORIZATION, b"Bearer -"),)
    return ClientRequest(method, request.path, kept + credential, body, request.model)


def scope_of(candidate: Candidate, plan: Plan) -> str | None:
    """The model whose limits an attempt on `candidate` counts against (None: the key as a whole)."""
    return candidate.upstream_model or plan.request.model


def addressed(plan: Plan, candidate: Candidate, key: PoolKey, default_base_url: str) -> Outgoing:
    """The request for `candidate`'s upstream with `key`: its URL, headers and (renamed) model."""
    request = plan.request
    dialect = candidate.group.upstream.dialect
    body = request.body
    named = plan.body_model or request.model
    if body and named and candidate.upstream_model and dialect == Dialect.OPENAI:
        body = renamed_top_model(body, named, candidate.upstream_model)
    return Outgoing(
        request.method,
        upstream_url(candidate, request.path, default_base_url),
        with_key(dialect, request.fields, key.value),
        body,
    )


# --------------------------------------------------------------------------- plan


def model_not_found(model: str | None) -> OpenAIError:
    if model is None:
        message = "No upstream group is enabled to serve this request: add or enable one (run.py groups list)."
        return OpenAIError(503, message, "server_error", "no_upstream_group", {"x-should-retry": "false"})
    return OpenAIError(
        404,
        f"The model `{model}` does not exist or is not served by this keyrotor gateway"
        " (GET /v1/models lists the models it serves).",
        "invalid_request_error",
        "model_not_found",
        {"x-should-retry": "false"},
    )


def route(table: RouteTable, model: str | None, allowed_groups: Container[str] | None) -> list[Candidate] | OpenAIError:
    """Where a request for `model` may go, in order, or why it is refused; a client limited to some
    groups only gets those (addons/access.py refused it if none serves the model)."""
    candidates = table.candidates(model)
    if not candidates and table.is_listed(model):
        return no_listed_group(model)
    if allowed_groups is not None:
        candidates = [c for c in candidates if c.group.label in allowed_groups]
    return candidates or model_not_found(model)


def no_listed_group(model: str | None) -> OpenAIError:
    """The groups that list the model are all disabled: it goes to no other group (a catch-all serves
    only models no group lists)."""
    message = (
        f"Every upstream group that lists the model `{model}` is disabled: enable one (run.py groups list),"
        " or name a fallback model (run.py models fallback)."
    )
    return OpenAIError(503, message, "server_error", "no_upstream_group", {"x-should-retry": "false"})


@dataclass(frozen=True)
class Owner:
    """The key that owns an object a request names: only it may serve the request."""

    key_id: int
    group: Group

    def candidate(self, model: str | None) -> Candidate:
        return Candidate(self.group, model, self.group.upstream_model(model) if model else None)


def key_of(rotations: Mapping[int, Rotation], key_id: int | None) -> tuple[Rotation | None, PoolKey | None]:
    for rotation in rotations.values():
        key = rotation.pool.by_id.get(key_id) if key_id is not None else None
        if key is not None:
            return rotation, key
    return None, None


def _gone_for_good(key: PoolKey) -> str | None:
    if key.state in REFUSED or key.state == KeyState.DISABLED:
        return f"is {key.state}" + (f" ({key.state_reason})" if key.state_reason else "")
    return None


def owner_route(owned: affinity.Affinity, rotations: Mapping[int, Rotation], table: RouteTable) -> Owner | OpenAIError:
    """A request naming owned objects goes to their key, whatever the strategy, or is refused (409)."""
    if owned.conflict:
        return affinity.owners_conflict(owned)
    key_id = owned.owner
    rotation, key = key_of(rotations, key_id)
    group = table.by_id.get(key.group_id) if key is not None and key.group_id is not None else None
    if key_id is None or key is None or rotation is None or group is None:
        return affinity.owner_unavailable(owned.owned, key_id or 0, "has been deleted")
    why = _gone_for_good(key)
    if why is not None:
        return affinity.owner_unavailable(owned.owned, key_id, why)
    if group not in table.groups:
        return affinity.owner_unavailable(owned.owned, key_id, f"is in {group.label}, disabled")
    return Owner(key_id, group)


def owner_error(plan: Plan, owned: tuple[str, ...], rotations: Mapping[int, Rotation]) -> OpenAIError:
    """Why the owner of `owned` cannot take the request: gone for good (409), or resting."""
    key_id = plan.only_key or 0
    rotation, key = key_of(rotations, plan.only_key)
    if key is None or rotation is None:
        return affinity.owner_unavailable(owned, key_id, "has been deleted")
    why = _gone_for_good(key)
    if why is not None:
        return affinity.owner_unavailable(owned, key_id, why)
    now = time.time()
    scope = scope_of(plan.candidates[0], plan)
    others = frozenset(rotation.pool.by_id) - {key_id}
    wait = rotation.pool.soonest_return(now, scope, others)
    rest = rotation.pool.resting(scope, now)
    health = rotation.pool.runtime.get(key_id)
    scoped = health.scopes.get(scope) if health is not None and scope is not None else None
    reason = (rest.reason if rest else None) or (scoped.reason if scoped else None) or key.state_reason
    return affinity.owner_resting(owned, key_id, wait, reason)


class Pinned(NamedTuple):
    """Where a request the admin pinned (a UI pass, core/passes.py) may go: one group's routes, one key."""

    routes: list[Candidate] | OpenAIError
    only_key: int | None
    note: str | None  # what the flow says of the pin


def pinned_route(
    table: RouteTable,
    routes: list[Candidate] | OpenAIError,
    model: str | None,
    rotations: Mapping[int, Rotation],
    access: AccessVerdict,
) -> Pinned:
    """`routes` (the request's, as the client may be served, or why it has none) narrowed to the group
    and key `access` is pinned to.

    A pinned group serves the model when it lists it or serves every model, even where routing
    would not take it there (a catch-all serves no model another group lists), and never falls
    back to another group. A pinned key that is gone (deleted, disabled, refused by upstream)
    leaves its group's pool to serve the request, and the note says so."""
    group_id, key_id = access.pinned_group, access.pinned_key
    only_key = None
    note = ""
    if key_id is not None:
        _, key = key_of(rotations, key_id)
        why = "has been deleted" if key is None else _gone_for_good(key)
        if key is not None and why is None:
            group_id = key.group_id if group_id is None else group_id
            if key.group_id != group_id:
                error = OpenAIError(
                    400,
                    f"Upstream key #{key_id} is not in upstream group #{group_id}, the group this request is"
                    " pinned to.",
                    "invalid_request_error",
                    "key_not_in_group",
                    {"x-should-retry": "false"},
                )
                return Pinned(error, None, None)
            only_key, note = key_id, f"pinned to upstream key #{key_id}"
        else:
            note = f"pinned upstream key #{key_id} {why}: the pool served it"
    if group_id is None:
        return Pinned(routes, None, note)
    kept = [] if isinstance(routes, OpenAIError) else [c for c in routes if c.group.id == group_id]
    group = table.by_id.get(group_id)
    if not kept and group is not None and group in table.groups and (model is None or group.serves(model)):
        kept = [Candidate(group, model, group.upstream_model(model) if model else None)]
    if not kept:
        error = OpenAIError(
            404,
            f"The upstream group this request is pinned to (#{group_id}) does not serve the model `{model}`,"
            " or is disabled.",
            "invalid_request_error",
            "model_not_found",
            {"x-should-retry": "false"},
        )
        return Pinned(error, None, None)
    where = f"pinned to {kept[0].group.label}"
    return Pinned(kept, only_key, f"{where}; {note}" if note else where)


# --------------------------------------------------------------------------- the first key


def first_key_now(plan: Plan, rotation_of: Callable[[int], Rotation | None]) -> tuple[int, PoolKey] | None:
    """(candidate index, key) free right now on the first route that has one."""
    for index, candidate in enumerate(plan.candidates):
        rotation = rotation_of(candidate.group.id)
        key = rotation.pick_now(scope_of(candidate, plan), plan.only_key) if rotation else None
        if key is not None:
            return index, key
    return None


def no_first_key(plan: Plan, rotations: Mapping[int, Rotation], owned: tuple[str, ...] = ()) -> OpenAIError:
    """The refusal when no route had a key for the first attempt, even after waiting."""
    if plan.only_key is not None and owned:
        return owner_error(plan, owned, rotations)
    last = plan.candidates[-1]
    return (rotations.get(last.group.id) or Rotation()).no_key_error(0, scope_of(last, plan))


# --------------------------------------------------------------------------- an attempt's outcome


class Verdict(StrEnum):
    """What follows an attempt of the flow itself (mitmproxy's own, the first one)."""

    ANSWER = "answer"  # the answer stands: good, the request's own fault, or already reaching the client
    RETRY = "retry"  # the key failed: another key, group or fallback model may serve it
    NEXT_GROUP = "next_group"  # upstream has no such model here: the next route may have it
    NEXT_MODEL = "next_model"  # the prompt is too long for this model: a fallback model may take it
    REFUSE = "refuse"  # a WebSocket upgrade refused for its key: our own 503 (retries speak no WebSocket)
    RELEASE = "release"  # the client left first: the key is free again and learns nothing


@dataclass(frozen=True)
class Judgement:
    outcome: Outcome | None  # what the answer says about the key; None: the request's own fault
    missing: bool  # upstream has no such model, and a later route may
    verdict: Verdict


GOOD = Judgement(OK, False, Verdict.ANSWER)


def judge(
    status: int, headers: HeaderLookup, content: bytes | None, more_routes: bool, now: float, fallback: bool = False
) -> Judgement:
    """Classify an answer (`content` is needed for 4xx and 5xx only; `fallback`: a later route
    serves a fallback model)."""
    if status == 404 and more_routes and is_model_missing(status, content):
        return Judgement(None, True, Verdict.NEXT_GROUP)
    if status == 400 and fallback and is_context_too_long(status, content):
        return Judgement(None, False, Verdict.NEXT_MODEL)  # the request's fault here, no key's
    outcome = classify_response(status, headers, content, now)
    if outcome is OK:
        return GOOD  # most answers: nothing to build
    return Judgement(
        outcome, False, Verdict.RETRY if outcome is not None and outcome.is_key_failure else Verdict.ANSWER
    )


def after_answer(judgement: Judgement, reached_client: Callable[[], bool], websocket: Callable[[], bool]) -> Verdict:
    """An answer can no longer be retried once part of it is on its way; a WebSocket upgrade never can.
    (What the flow is asked only when it matters: most answers stand as they are.)"""
    if judgement.verdict == Verdict.ANSWER or (not judgement.missing and reached_client()):
        return Verdict.ANSWER
    if websocket():  # a prompt too long is no key's fault: upstream's 400 stands
        return Verdict.ANSWER if judgement.verdict == Verdict.NEXT_MODEL else Verdict.REFUSE
    return judgement.verdict


def after_error(message: str, reached_client: Callable[[], bool], websocket: Callable[[], bool]) -> Verdict:
    """An attempt that got no whole answer: the client left, too late to retry, or retry."""
    if is_client_side(message):
        return Verdict.RELEASE
    if reached_client() or websocket():
        return Verdict.ANSWER  # part of the answer reached the client, or a WebSocket: too late to retry
    return Verdict.RETRY


# --------------------------------------------------------------------------- the retries


class Move(StrEnum):
    LEAVE = "leave"  # the request leaves this route's group for the next route (a group or fallback model)
    TAKE_KEY = "take_key"  # a key of this route's group: free now, or (last route) back before the deadline
    SEND = "send"  # an attempt with that key
    STOP = "stop"  # no more attempts: the last answer stands, or a refusal


@dataclass(frozen=True)
class Step:
    move: Move
    index: int  # the route (core.routing.Candidate) in the plan
    scope: str | None = None
    exclude: frozenset[int] = frozenset()  # keys that failed this request here and may not serve it again
    wait: bool = False  # TAKE_KEY: the key may be waited for until the request's deadline
    key: PoolKey | None = None  # SEND

    def __str__(self) -> str:
        extra = " wait" if self.wait else ""
        if self.key is not None:
            extra += f" key {self.key.id}"
        return f"{self.move} {self.index}{extra}"


def _served_as(candidate: Candidate) -> tuple[int, str | None]:
    """Which upstream's model an attempt on `candidate` asks for."""
    return candidate.group.upstream.id, candidate.upstream_model


def tried_on(candidate: Candidate, attempt: AttemptLog) -> bool:
    """Whether `attempt` went to `candidate`: its group, for its model (an attempt names the model
    only when it was a fallback). A fallback model served by the same group has its own count, so
    the primary's failures do not use up the fallback's attempts."""
    if attempt.group_id is not None and attempt.group_id != candidate.group.id:
        return False
    return attempt.model == (candidate.model if candidate.fallback_from else None)


def _tripped(rotation: Rotation, scope: str | None) -> bool:
    """The pool rests for `scope` because upstream failed it on every key (not for a pool-wide 429)."""
    rest = rotation.pool.resting(scope, time.time())
    return rest is not None and rest.probes


def _proven(rotation: Rotation | None, key_id: int) -> bool:
    """Whether upstream has accepted `key_id` since the start (a key no longer in the pool counts
    as proven: what it failed says as much about the request as before)."""
    runtime = rotation.pool.runtime.get(key_id) if rotation is not None else None
    return runtime is None or runtime.proven


@dataclass
class Journey:
    """The retries of one request: each call takes what happened and says what to do next.

    Within a group no key that failed the request is tried again while another could serve;
    rate-limited attempts do not use up `max_attempts` while waiting (up to `wait_max_seconds`)
    can still help, nor do failures of keys not yet proven while a key not yet tried is left.
    A 5xx or lost answer that repeats on a second key follows the request: the next group may
    serve it, else the client gets it as it is. Only keys that upstream has accepted since the
    start (proven) count for that: a key not yet proven that fails is more likely a bad key than
    a bad request, so the request goes on to a key not yet tried.
    """

    plan: Plan
    use: KeyUse
    settings: RotationSettings
    rotation_of: Callable[[int], Rotation | None]  # a group's rotation (None: the group is gone)
    answered: Outcome | None  # what the latest answer said (None: none yet, or the request's own fault)
    index: int = 0
    answered_by: Candidate | None = None  # the route of the latest whole answer
    trail: list[Step] = field(default_factory=list)
    too_long_for: str | None = None  # a model the prompt is too long for: its routes are left untried
    silent: tuple[int, str | None] | None = None  # (upstream, its model) that left an attempt silent
    unhinted: list[AttemptLog] = field(default_factory=list)  # attempts answered 429 with no Retry-After
    rate_limited_round: bool = False  # every usable key of the last route answered 429 with no Retry-After

    def start(self, model_missing: bool, alive: bool, too_long: bool = False, timed_out: bool = False) -> Step:
        self.index = self.use.candidate
        self._note_429()
        if too_long:
            self.too_long_for = self.plan.candidates[self.index].model
        if model_missing or too_long or (timed_out and self._timed_out()):
            return self._leave()
        return self.next(alive)

    def next(self, alive: bool) -> Step:
        """Where the request goes now."""
        candidates, settings = self.plan.candidates, self.settings
        if self.index >= len(candidates) or not alive:
            return self._stop()
        candidate = candidates[self.index]
        if self.too_long_for is not None and candidate.model == self.too_long_for:
            return self._leave()  # no key of any group makes this model's context longer
        if self.silent is not None and _served_as(candidate) == self.silent:
            return self._leave()  # the model is silent at this upstream, whatever the key
        last = self.index == len(candidates) - 1
        if last and self._round_of_429s(candidate):
            # Waiting out unhinted 429s key after key would only make more rounds within seconds:
            # the client gets upstream's 429, with a Retry-After of keyrotor's own.
            self.rate_limited_round = True
            return self._stop()
        here = [a for a in self.use.attempts if tried_on(candidate, a)]
        limited = sum(a.status == 429 for a in here)
        rotation = self.rotation_of(candidate.group.id)
        # While a key the request has not tried is left, new keys' failures are theirs (see _spared).
        fresh = self._untried_left(rotation, here, scope_of(candidate, self.plan))
        troubled = {
            a.key_id
            for a in here
            if (a.status is None or a.status >= 500) and (not fresh or _proven(rotation, a.key_id))
        }
        spared = len({a.key_id for a in here if a.status != 429 and not _proven(rotation, a.key_id)}) if fresh else 0
        if (
            rotation is None
            or len(here) - limited - spared >= settings.max_attempts
            or limited > settings.max_attempts + MAX_RATE_LIMITED_ATTEMPTS
            or len(troubled) >= GROUP_FAILURES
        ):
            if last and len(troubled) >= GROUP_FAILURES:
                return self._stop()  # it followed the request from key to key: the client gets the last answer
            return self._leave()
        scope = scope_of(candidate, self.plan)
        if last and here and (here[-1].status or 0) >= 500 and _tripped(rotation, scope):
            # Upstream fails the model whatever the key (the pool rests for it; a probe will say when
            # it is back): waiting for that probe would hold the client for nothing, so it gets the
            # answer upstream gave, as it would once its keys had served.
            return self._stop()
        exclude = frozenset(a.key_id for a in here if a.status != 429)  # rate limits end; failures stay
        return self._step(Step(Move.TAKE_KEY, self.index, scope, exclude, wait=last))

    def _untried_left(self, rotation: Rotation | None, here: list[AttemptLog], scope: str | None) -> bool:
        """Whether the group has an active key this request has not tried. Until none is left, a
        key not yet proven that failed the request is blamed for it: its failure neither uses up
        `max_attempts` nor makes the request's 5xx follow it (each key is tried once, so the pool
        bounds those attempts); once every key has had its turn, the usual rules apply. A key resting
        for the request's model is no turn left: the request cannot have it (a provider's outage
        right after a start would otherwise wait out wait_max_seconds for it)."""
        if rotation is None or self.plan.only_key is not None:
            return False
        tried, now, pool = {a.key_id for a in here}, time.time(), rotation.pool
        return any(
            k.state == KeyState.ACTIVE and k.id not in tried and not pool.rests_in(k, scope, now) for k in pool.keys
        )

    def took(self, key: PoolKey | None, alive: bool) -> Step:
        """The key TAKE_KEY got (None: none came back in time)."""
        if not alive:
            return self._stop()  # the client went away while it waited: no attempt for nobody
        if key is None:
            return self._leave()
        self.use.candidate = self.index
        scope = scope_of(self.plan.candidates[self.index], self.plan)
        return self._step(Step(Move.SEND, self.index, scope, key=key))

    def lost(self, alive: bool, timed_out: bool = False) -> Step:
        """The attempt got no whole answer (connection error, timeout)."""
        self.answered = None
        if timed_out and alive and self._timed_out():
            return self._leave()
        return self.next(alive)

    def _timed_out(self) -> bool:
        """An attempt was left silent: its model at its upstream is likely silent on every key, so
        the request goes on to a route elsewhere (another upstream or model), when it has one."""
        silent = _served_as(self.plan.candidates[self.index])
        if all(_served_as(c) == silent for c in self.plan.candidates[self.index + 1 :]):
            return False  # nowhere else to go: another key of the same upstream is the best chance
        self.silent = silent
        return True

    def judged(self, judgement: Judgement, alive: bool) -> Step:
        """The attempt got a whole answer, which `judgement` classified."""
        self.answered, self.answered_by = judgement.outcome, self.plan.candidates[self.index]
        self._note_429()
        if judgement.verdict == Verdict.NEXT_GROUP:
            return self._leave()
        if judgement.verdict == Verdict.NEXT_MODEL:
            self.too_long_for = self.plan.candidates[self.index].model
            return self._leave()
        if judgement.verdict == Verdict.ANSWER:
            return self._stop()
        return self.next(alive)

    def more_routes(self) -> bool:
        return self.index < len(self.plan.candidates) - 1

    def fallback_ahead(self) -> bool:
        return self.plan.fallback_after(self.index)

    def end(self) -> bool:
        """Settle the request; True when keyrotor refuses it: every attempt failed because of our keys."""
        use, by = self.use, self.answered_by
        use.settled = True
        use.fallback_model = by.model if by and by.fallback_from else None
        return self.answered is not None and self.answered.kind in KEY_ONLY_FAILURES and not self.rate_limited_round

    def retry_after(self, now: float) -> str | None:
        """The Retry-After of upstream's 429 after a round of them: when a key of the route is back."""
        if not self.rate_limited_round:
            return None
        candidate = self.plan.candidates[-1]
        rotation = self.rotation_of(candidate.group.id)
        wait = rotation.pool.soonest_return(now, scope_of(candidate, self.plan)) if rotation is not None else None
        return str(max(1, math.ceil(wait or 0)))

    def _note_429(self) -> None:
        answered, attempts = self.answered, self.use.attempts
        if answered is not None and answered.kind == OutcomeKind.RATE_LIMITED and answered.wait is None and attempts:
            self.unhinted.append(attempts[-1])

    def _round_of_429s(self, candidate: Candidate) -> bool:
        """Whether the latest answer is a 429 with no Retry-After, after every key of `candidate`'s
        group that could serve answered this request the same way on it (one pool-wide round)."""
        answered = self.answered
        if answered is None or answered.kind != OutcomeKind.RATE_LIMITED or answered.wait is not None:
            return False
        rotation = self.rotation_of(candidate.group.id)
        if rotation is None:
            return False
        usable = {k.id for k in rotation.pool.keys if k.state in (KeyState.ACTIVE, KeyState.COOLING)}
        if self.plan.only_key is not None:
            usable &= {self.plan.only_key}
        limited = {a.key_id for a in self.unhinted if tried_on(candidate, a)}
        return bool(usable) and usable <= limited

    def _leave(self) -> Step:
        step = self._step(Step(Move.LEAVE, self.index))
        self.index += 1
        return step

    def _stop(self) -> Step:
        return self._step(Step(Move.STOP, self.index))

    def _step(self, step: Step) -> Step:
        self.trail.append(step)
        return step


def upgrade_refusal(use: KeyUse, rotations: Mapping[int, Rotation]) -> OpenAIError:
    """A WebSocket upgrade (Realtime) refused for its key: the key has learnt, and the client gets the
    503 whose Retry-After says when connecting again finds another key."""
    rotation = rotations.get(use.group_id) if use.group_id is not None else None
    return (rotation or Rotation()).no_key_error(len(use.attempts))


def retry_refusal(
    plan: Plan,
    use: KeyUse,
    rotations: Mapping[int, Rotation],
    referenced: tuple[str, ...] = (),
    owners: Mapping[str, int] | None = None,
) -> OpenAIError:
    """keyrotor's own answer when every retry failed because of our keys (`referenced`: the object
    ids the request names, `owners`: who owns which object now)."""
    if plan.only_key is not None:
        return owner_error(plan, affinity.resolve(referenced, owners or {}).owned, rotations)
    rotation = rotations.get(use.group_id) if use.group_id is not None else None
    return (rotation or Rotation()).no_key_error(len(use.attempts), use.scope)


# --------------------------------------------------------------------------- renaming back


class Rename(StrEnum):
    NONE = "none"  # the client asked for the model upstream answered as
    WHOLE = "whole"  # the answer's body, once whole
    EVENTS = "events"  # a stream's events, as they pass


def rename_back(candidate: Candidate | None, headers: HeaderLookup) -> Rename:
    """How the answer of `candidate` gets the client's model name back (an alias or a fallback)."""
    if candidate is None or not candidate.renames:
        return Rename.NONE
    return Rename.EVENTS if "text/event-stream" in (headers.get("content-type", "") or "") else Rename.WHOLE


def renamed_back(candidate: Candidate | None, body: bytes) -> bytes:
    """`body` (a whole answer, or stream events) naming the client's model where upstream named its own."""
    if candidate is None or candidate.model is None or candidate.upstream_model is None:
        return body
    return renamed_model(body, candidate.upstream_model, candidate.model)
