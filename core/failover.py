"""Carrying out core/dispatch.py's decisions for one request: the waits, the retries, the learning.

Nothing is decided here. This waits for a key when a decision says so, sends a retry
upstream with httpx (mitmproxy cannot send a flow twice), and tells each group's rotation
what its attempts met, so that its pool learns. A retried event stream is judged on its
headers and first chunk (core/upstream.py) and handed back with the rest still to read.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx

from core import telemetry, upstream
from core.classify import HeaderLookup, Outcome, connection_failure, is_deployment_missing
from core.credentials import placeholder
from core.dialects import upstream_url
from core.dispatch import (
    Journey,
    Judgement,
    Move,
    Plan,
    Step,
    Verdict,
    addressed,
    after_answer,
    after_error,
    first_key_now,
    judge,
    scope_of,
)
from core.metadata import KeyUse
from core.models import PoolKey
from core.rotation import Rotation, RotationSettings
from core.routing import Candidate

Send = Callable[
    [httpx.AsyncClient, str, str, list[tuple[bytes, bytes]], bytes | None, float], Awaitable[upstream.Answer]
]


@dataclass
class RetryResult:
    # The last answer, None when no attempt got one: whole, or a stream with its rest to read (answer.rest).
    answer: upstream.Answer | None
    refuse: bool  # every attempt failed because of our keys: answer with a 503 of our own instead
    candidate: Candidate | None = None  # the route of `answer`
    trail: tuple[Step, ...] = ()  # the decisions taken on the way
    retry_after: str | None = None  # upstream's 429 after a round of them: the Retry-After the client gets


class Failover:
    def __init__(
        self,
        rotations: Callable[[int], Rotation | None],
        settings: Callable[[], RotationSettings],
        send: Send | None = None,
    ) -> None:
        self._rotation_of = rotations
        self._settings = settings
        self._send = send  # None: core.upstream.send

    async def first_key(self, plan: Plan, deadline: float) -> tuple[int, PoolKey] | None:
        """(candidate index, key) for a first attempt: the first route with a key free now, else
        the first with one that comes back before `deadline`."""
        chosen = first_key_now(plan, self._rotation_of)
        if chosen is not None:
            return chosen
        for index, candidate in enumerate(plan.candidates):
            rotation = self._rotation_of(candidate.group.id)
            if rotation is None:
                continue
            last = index == len(plan.candidates) - 1
            key = await rotation.acquire(
                frozenset(), deadline if last else time.time(), scope_of(candidate, plan), only=plan.only_key
            )
            if key is not None:
                return index, key
        return None

    def begin(
        self,
        candidate: Candidate,
        index: int,
        key: PoolKey,
        client_id: int | None,
        scope: str | None,
        scope_known: bool = True,
    ) -> KeyUse:
        """The first attempt, on route `index` with `key`."""
        use = KeyUse(candidate=index, client_id=client_id)
        fallback = candidate.model if candidate.fallback_from else None
        rotation = self._rotation_of(candidate.group.id)
        assert rotation is not None, "a key was picked from this group's rotation"
        rotation.begin(use, key, candidate, fallback, scope, scope_known)
        use.fallback_model = fallback
        return use

    def answered(
        self,
        use: KeyUse,
        more_routes: bool,
        status: int,
        headers: HeaderLookup,
        content: bytes | None,
        model_of: Callable[[], str | None],
        reached_client: Callable[[], bool],
        websocket: Callable[[], bool],
        fallback: bool = False,
    ) -> tuple[Verdict, Judgement]:
        """The first attempt's answer: its key learns, and the verdict says what follows
        (`fallback`: a later route serves a fallback model)."""
        judgement = judge(status, headers, content, more_routes, time.time(), fallback)
        rotation = self._rotation_of(use.group_id) if use.group_id is not None else None
        if rotation is not None:
            self._end(rotation, use, judgement.outcome, status, None, model_of)
        verdict = after_answer(judgement, reached_client, websocket)
        if verdict == Verdict.ANSWER or verdict == Verdict.REFUSE:
            use.settled = True  # a good answer, the request's own fault, already on its way, or a WebSocket
            (rotation or Rotation()).settle(use)
        return verdict, judgement

    def missing(self, candidate: Candidate, status: int, content: bytes | None) -> None:
        """An answer that said the model is missing: when it is Azure's DeploymentNotFound, `candidate`'s
        group is not asked for that deployment again while another route serves the model, until the
        routes change (core/state.py)."""
        rotation = self._rotation_of(candidate.group.id)
        name = candidate.upstream_model
        if rotation is not None and name is not None and is_deployment_missing(status, content):
            rotation.missing.add(name)

    def failed(
        self,
        use: KeyUse,
        message: str,
        model_of: Callable[[], str | None],
        reached_client: Callable[[], bool],
        websocket: Callable[[], bool],
    ) -> Verdict:
        """The first attempt got no whole answer: its key learns (unless the client left first)."""
        verdict = after_error(message, reached_client, websocket)
        rotation = self._rotation_of(use.group_id) if use.group_id is not None else None
        if verdict == Verdict.RELEASE:
            # The client hung up before its answer was settled: the key it held is free again,
            # and learns nothing (the key did no wrong, nor was it proven).
            if rotation is not None:
                rotation.release(use, message)
            use.settled = True
            return verdict
        if rotation is not None:
            self._end(rotation, use, connection_failure(message), None, message, model_of)
        if verdict == Verdict.ANSWER:
            use.settled = True
            if rotation is not None:
                rotation.settle(use)
        return verdict

    @staticmethod
    def _end(
        rotation: Rotation,
        use: KeyUse,
        outcome: Outcome | None,
        status: int | None,
        error: str | None,
        model_of: Callable[[], str | None],
    ) -> None:
        if rotation.needs_scope(use, outcome):
            use.scope, use.scope_known = model_of(), True
        rotation.end(use, outcome, status, error)

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
        too_long: bool = False,
        timed_out: bool = False,
        first_token_seconds: float = 0.0,
    ) -> RetryResult:
        """Send the request again, as core.dispatch.Journey decides, until an answer the client can
        use or nothing is left to try.

        `answered` is what the answer the client would get now said (None: no answer yet);
        `model_missing` that its upstream has no such model; `alive` whether the client still waits;
        `too_long` that the prompt is too long for the model (its fallback models may take it);
        `timed_out` that the attempt got nothing in time (a route elsewhere goes next, when there is one);
        `first_token_seconds` (0: none) how long a stream's first chunk may take, as for a first attempt.
        """
        settings = self._settings()
        send = self._send or upstream.send
        deadline = time.time() + settings.wait_max_seconds
        journey = Journey(plan, use, settings, self._rotation_of, answered)
        answer: upstream.Answer | None = None
        rotation: Rotation | None = None

        def living() -> bool:
            return alive is None or alive()

        sent = use.attempts[-1] if use.attempts else None
        if sent is not None and sent.url is None and use.candidate < len(plan.candidates):  # mitmproxy sent it
            sent.url = upstream_url(plan.candidates[use.candidate], plan.request.path, default_base_url)
        step = journey.start(model_missing, living(), too_long, timed_out)
        while step.move != Move.STOP:
            candidate = plan.candidates[step.index]
            if step.move == Move.LEAVE:
                self._leave(use, candidate)
                step = journey.next(living())
            elif step.move == Move.TAKE_KEY:
                rotation = self._rotation_of(candidate.group.id)
                assert rotation is not None, "the journey takes keys only where a rotation is"
                until = deadline if step.wait else time.time()
                key = await rotation.acquire(step.exclude, until, step.scope, alive, plan.only_key)
                step = journey.took(key, living())
            else:
                assert rotation is not None and step.key is not None
                key = step.key
                rotation.begin(use, key, candidate, candidate.model if candidate.fallback_from else None, step.scope)
                outgoing = addressed(plan, candidate, key, default_base_url)
                use.attempts[-1].url = outgoing.url
                fields, body = list(outgoing.fields), outgoing.body
                if use.attempts[0].span_id is not None:  # traced (addons/otel.py): a span of its own
                    fields = telemetry.attempt_fields(fields, use.attempts[-1])
                try:
                    got = await send(client, outgoing.method, outgoing.url, fields, body, first_token_seconds)
                except httpx.HTTPError as e:
                    message = upstream.error_text(e)
                    rotation.end(use, connection_failure(message), None, message)
                    step = journey.lost(living(), isinstance(e, httpx.ReadTimeout))
                    continue
                if answer is not None:
                    await answer.discard()  # (a stream is good, so never followed by another attempt)
                stand_in = placeholder(key.id, key.last4)
                if got.streaming:  # its echo is replaced as it passes, like a first attempt's
                    answer = dataclasses.replace(got, echo=(key.value, stand_in))
                else:
                    answer = got.without_echo(key.value, stand_in)  # upstream may quote our key
                content = answer.content if answer.status >= 400 else None
                more, fallback = journey.more_routes(), journey.fallback_ahead()
                judgement = judge(answer.status, answer.headers, content, more, time.time(), fallback)
                rotation.end(use, judgement.outcome, answer.status, None)
                if judgement.missing:
                    self.missing(candidate, answer.status, content)
                step = journey.judged(judgement, living())
        if step.index < len(plan.candidates):
            self._leave(use, plan.candidates[step.index])
        refuse = journey.end()
        retry_after = journey.retry_after(time.time())
        return RetryResult(answer, refuse, journey.answered_by, tuple(journey.trail), retry_after)
