"""One request across keys, groups and fallback models, until an answer the client can use.

The first attempt goes through mitmproxy (so a good answer streams unbuffered); when it
fails, `retry` sends the request again with httpx: another key of the same group after
a key's failure, the next group when this one cannot serve (no usable key, upstream
says the model does not exist, 5xx or connection errors twice in a row), then the
model's fallback models. A failure that is the request's own goes back as it is.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from core import upstream
from core.classify import (
    KEY_ONLY_FAILURES,
    Outcome,
    classify_response,
    connection_failure,
    is_model_missing,
)
from core.credentials import placeholder
from core.dialects import upstream_url, with_key
from core.metadata import KeyUse
from core.models import PoolKey
from core.rotation import Rotation, RotationSettings
from core.routing import Candidate, Dialect, renamed_model

# Keys of one group on which a request met 5xx or connection errors before it tries the next group.
GROUP_FAILURES = 2


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

    def candidate(self, use: KeyUse) -> Candidate:
        return self.candidates[use.candidate]


def addressed(plan: Plan, candidate: Candidate, key: PoolKey, default_base_url: str) -> Outgoing:
    """The request for `candidate`'s upstream with `key`: its URL, headers and (renamed) model."""
    request = plan.request
    dialect = candidate.group.upstream.dialect
    body = request.body
    named = plan.body_model or request.model
    if body and named and candidate.upstream_model and dialect == Dialect.OPENAI:
        body = renamed_model(body, named, candidate.upstream_model, count=1)
    return Outgoing(
        request.method,
        upstream_url(candidate, request.path, default_base_url),
        with_key(dialect, request.fields, key.value),
        body,
    )


@dataclass
class RetryResult:
    answer: upstream.Answer | None  # the last whole answer, None when no attempt got one
    refuse: bool  # every attempt failed because of our keys: answer with a 503 of our own instead
    candidate: Candidate | None = None  # the route of `answer`


# Rate-limited attempts beyond max_attempts a request may make while it waits within wait_max_seconds.
MAX_RATE_LIMITED_ATTEMPTS = 10


def scope_of(candidate: Candidate, plan: Plan) -> str | None:
    """The model whose limits an attempt on `candidate` counts against (None: the key as a whole)."""
    return candidate.upstream_model or plan.request.model


class Failover:
    def __init__(self, rotations: Callable[[int], Rotation | None], settings: Callable[[], RotationSettings]) -> None:
        self._rotation_of = rotations
        self._settings = settings

    async def first_key(self, plan: Plan, deadline: float) -> tuple[int, PoolKey] | None:
        """(candidate index, key) for a first attempt: the first route with a key free now, else
        the first with one that comes back before `deadline`."""
        for index, candidate in enumerate(plan.candidates):
            rotation = self._rotation_of(candidate.group.id)
            key = rotation.pick_now(scope_of(candidate, plan)) if rotation else None
            if key is not None:
                return index, key
        for index, candidate in enumerate(plan.candidates):
            rotation = self._rotation_of(candidate.group.id)
            if rotation is None:
                continue
            last = index == len(plan.candidates) - 1
            key = await rotation.acquire(frozenset(), deadline if last else time.time(), scope_of(candidate, plan))
            if key is not None:
                return index, key
        return None

    def _leave(self, use: KeyUse, candidate: Candidate) -> None:
        rotation = self._rotation_of(candidate.group.id)
        if rotation is not None:
            rotation.settle(use)

    async def retry(
        self,
        client: httpx.AsyncClient,
        use: KeyUse,
        plan: Plan,
        answered: Outcome | None,
        default_base_url: str,
        model_missing: bool = False,
        alive: Callable[[], bool] | None = None,
    ) -> RetryResult:
        """Send the request again until an answer the client can use, or nothing is left to try.

        `answered` is what the answer the client would get now said (None: no answer yet);
        `model_missing` that its upstream has no such model; `alive` whether the client still waits.
        Within a group no key that failed the request is tried again while another could serve;
        rate-limited attempts do not use up `max_attempts` while waiting (up to `wait_max_seconds`)
        can still help. A 5xx or lost answer that repeats on a second key follows the request:
        the next group may serve it, else the client gets it as it is.
        """
        settings = self._settings()
        answer: upstream.Answer | None = None
        answered_by: Candidate | None = None
        deadline = time.time() + settings.wait_max_seconds
        index = use.candidate
        if model_missing:
            self._leave(use, plan.candidates[index])
            index += 1
        while index < len(plan.candidates) and (alive is None or alive()):
            candidate = plan.candidates[index]
            rotation = self._rotation_of(candidate.group.id)
            last = index == len(plan.candidates) - 1
            here = [a for a in use.attempts if a.group_id == candidate.group.id or a.group_id is None]
            limited = [a for a in here if a.status == 429]
            troubled = {a.key_id for a in here if a.status is None or a.status >= 500}
            spent = len(here) - len(limited) >= settings.max_attempts
            if (
                rotation is None
                or spent
                or len(limited) > settings.max_attempts + MAX_RATE_LIMITED_ATTEMPTS
                or len(troubled) >= GROUP_FAILURES
            ):
                if last and len(troubled) >= GROUP_FAILURES:
                    break  # it followed the request from key to key: the client gets the last answer
                self._leave(use, candidate)
                index += 1
                continue
            scope = scope_of(candidate, plan)
            exclude = frozenset(a.key_id for a in here if a.status != 429)  # rate limits end; failures stay
            key = await rotation.acquire(exclude, deadline if last else time.time(), scope, alive)
            if alive is not None and not alive():
                break  # the client went away while it waited: no attempt for nobody
            if key is None:
                self._leave(use, candidate)
                index += 1
                continue
            use.candidate = index
            rotation.begin(use, key, candidate, candidate.model if candidate.fallback_from else None, scope)
            outgoing = addressed(plan, candidate, key, default_base_url)
            try:
                got = await upstream.send(client, outgoing.method, outgoing.url, list(outgoing.fields), outgoing.body)
            except httpx.HTTPError as e:
                message = upstream.error_text(e)
                rotation.end(use, connection_failure(message), None, message)
                answered = None
                continue
            got = got.without_echo(key.value, placeholder(key.id, key.last4))  # upstream may quote our key
            content = got.content if got.status >= 400 else None
            missing = is_model_missing(got.status, content)
            answered = None if missing else classify_response(got.status, got.headers, content, time.time())
            rotation.end(use, answered, got.status, None)
            answer, answered_by = got, candidate
            if missing and not last:
                self._leave(use, candidate)
                index += 1
                continue
            if answered is None or not answered.is_key_failure:
                break
        if index < len(plan.candidates):
            self._leave(use, plan.candidates[index])
        use.settled = True
        use.fallback_model = answered_by.model if answered_by and answered_by.fallback_from else None
        refuse = answered is not None and answered.kind in KEY_ONLY_FAILURES
        return RetryResult(answer, refuse, answered_by)
