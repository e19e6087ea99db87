"""Where to and with which key: the hooks that route a request by model to a group, swap in a
key from its pool, and send it again elsewhere when the key fails.

core/dispatch.py decides each step (core/failover.py waits and retries); the hooks apply the
decisions to the flow. Every answer streams unbuffered, a first attempt's as mitmproxy forwards
it, a retried one as addons/retry_stream.py feeds it; other retried answers arrive whole.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Coroutine

import httpx
from mitmproxy import ctx, exceptions, http
from mitmproxy.addonmanager import Loader

from config import ConfigError, Settings, checked_options, default_of, names_in, settings_in
from core import affinity, dispatch, metadata, upstream
from core.classify import Outcome, is_timeout
from core.credentials import KeyHandoff, placeholder
from core.dialects import upstream_url, url_parts, with_key
from core.dispatch import Plan, Rename, Verdict
from core.errors import OpenAIError
from core.failover import Failover
from core.metadata import CLIENT_REQUEST, FIRST_BYTE_AT, KEYPOOL, AccessVerdict, ClientRequest, KeyUse, RequestedModel
from core.models import PoolKey
from core.pool import Policy
from core.ports import OwnershipSink
from core.request_model import model_of, renamed_top_model
from core.rotation import RotationSettings
from core.routing import Candidate, Dialect, reverse_target_of
from core.state import ProxyState
from core.usage import EventFilter, chained

log = logging.getLogger(__name__)


def reached_client(flow: http.HTTPFlow) -> bool:
    return metadata.reached_client(flow.metadata, flow.response is not None and bool(flow.response.stream))


def response_of(answer: upstream.Answer) -> http.Response:
    """A whole answer, or a stream's head as upstream sent it (its body is fed as it comes)."""
    content, ended = (None, None) if answer.streaming else (answer.content, answer.ended_at)
    fields = http.Headers(answer.header_fields())
    return http.Response(b"HTTP/1.1", answer.status, answer.reason, fields, content, None, answer.first_byte_at, ended)


def aim(request: http.Request, url: str) -> None:
    """Send `request` to `url` instead of the reverse-proxy target.

    mitmproxy's url and host setters run the host through IDNA and rewrite the Host header
    twice (~60 µs a request); the request's data is set directly, once (core.dialects.url_parts).
    """
    data = request.data
    data.scheme, data.host, data.port, netloc, data.path = url_parts(url)
    if "Host" in data.headers:
        data.headers["Host"] = netloc
    if data.authority:
        data.authority = netloc.encode()


def is_websocket_upgrade(request: http.Request) -> bool:
    return request.headers.get("upgrade", "").lower() == "websocket"


class KeyPool:
    def __init__(
        self,
        defaults: Settings | None = None,
        sender: KeyHandoff | None = None,
        state: ProxyState | None = None,
        writer: OwnershipSink | None = None,
        streamer: upstream.StreamHandoff | None = None,
    ) -> None:
        self._defaults = defaults
        # The runtime's (addons/runtime.py): the route table, a Rotation per group and the object
        # owners, kept fresh by its one revision watcher. The hooks read them there.
        self.state = state if state is not None else ProxyState()
        self.failover = Failover(self.state.rotations.get, lambda: self.state.settings)
        self._plans: dict[str, Plan] = {}  # by flow.id: the routes hold groups, too big for flow.metadata
        self._writer = writer  # where learnt object owners go (the runtime's writer)
        self._client: httpx.AsyncClient | None = None
        self.sender = sender  # addons/credential_sender.py's, handed over by the -s entry
        self._outgoing: dict[str, str] | None = None  # the sender's, once running() finds its patch in
        self.streamer = streamer  # addons/retry_stream.py's: a retried stream is left there to be fed
        self._first_token = 0.0
        # Key affinity, per flow: what it names and what its stream showed.
        self._referenced: dict[str, tuple[str, ...]] = {}
        self._streamed: dict[str, affinity.ObjectWatch] = {}

    def load(self, loader: Loader) -> None:
        # Each keypool_* option as config.py declares its setting: type, default, help and choices.
        for setting in settings_in("keypool"):
            default = default_of(self._defaults, setting.name)
            loader.add_option(setting.option, type(setting.default), default, setting.help, setting.choices)

    def configure(self, updated: set[str]) -> None:
        options = ctx.options
        try:
            checked_options(options, updated, names_in("keypool"))
        except ConfigError as e:
            raise exceptions.OptionsError(str(e)) from None
        settings = RotationSettings(
            strategy=options.keypool_strategy,
            max_attempts=options.keypool_max_attempts,
            wait_max_seconds=options.keypool_wait_max_seconds,
            policy=Policy(
                cooldown_seconds=options.keypool_cooldown_seconds,
                max_cooldown_seconds=options.keypool_max_cooldown_seconds,
                failure_threshold=options.keypool_failure_threshold,
                failure_cooldown_seconds=options.keypool_failure_cooldown_seconds,
                pool_429_window_seconds=options.keypool_pool_429_window_seconds,
            ),
        )
        self.state.configure(settings)
        self._first_token = float(options.keypool_first_token_seconds)  # also a retried stream's limit

    def running(self) -> None:
        # The key goes on only as the request's bytes leave, and its echo comes out as the answer
        # arrives (addons/credential_sender.py): no hook, view, flow file or record holds it.
        # (The sender is loaded beside this addon by addons/keyrotor.py; without it, the key goes on here.)
        sender = self.sender
        self._outgoing = sender.outgoing if sender is not None and sender.installed else None
        self._client = upstream.new_client(ctx.options.keypool_attempt_timeout_seconds)

    def done(self) -> None:
        self._client = None  # its pooled connections close with the process

    # ------------------------------------------------------------------ hooks

    # The hooks apply core/dispatch.py's decisions to the flow, and core/failover.py carries out
    # the waits and retries. They are plain functions that return a coroutine only when they must
    # wait (for a key, or for a retry): mitmproxy awaits what a hook returns, and the common case
    # then costs no coroutine at all.

    def request(self, flow: http.HTTPFlow) -> Coroutine | None:
        if flow.response:
            return None
        request = flow.request
        referenced = affinity.referenced_once(flow.metadata, request.path, request.raw_content)
        if referenced:
            self._referenced[flow.id] = referenced
            owned = affinity.resolve(referenced, self.state.owners)
            if owned.owners:
                return self._request_for_owner(flow, owned)
        access = AccessVerdict.of(flow.metadata)
        pinned = access is not None and access.pinned  # the UI's pass: one group or key (core/passes.py)
        table = self.state.table
        if table.only is not None and not pinned:
            # One group for everything, nothing renamed: today's single pool, at today's cost. The
            # model is read only while some model rests (until then the pick does not depend on it).
            rotation = self.state.rotations[table.only.group.id]
            model = self._model_of(flow) if rotation.pool.scoped_until > time.time() else None
            key = rotation.pick_now(model)
            if key is None:  # waiting for a key: the slow path, which knows the model
                model = model or self._model_of(flow)
                return self._send_first(flow, self._plan(flow, [table.only], model))
            self._send_with(flow, None, table.only, 0, key, model, scope_known=model is not None)
            return None
        # GET /v1/models was answered before this hook (addons/models.py) unless upstream's list is wanted.
        model = None
        if request.method == "POST" or is_websocket_upgrade(request):  # a WebSocket names it in the URL
            named = self._named(flow)
            if not isinstance(named, RequestedModel):
                self._refuse(flow, named)
                return None
            model = named.model
        routes = dispatch.route(table, model, access.groups if access is not None else None)
        only_key = None
        if pinned and access is not None:
            routes, only_key, access.pin_note = dispatch.pinned_route(
                table, routes, model, self.state.rotations, access
            )
        if isinstance(routes, OpenAIError):
            self._refuse(flow, routes)
            return None
        return self._send_first(flow, self._plan(flow, self.state.usable(routes), model, only_key))

    # ------------------------------------------------------------------ key affinity

    def _request_for_owner(self, flow: http.HTTPFlow, owned: affinity.Affinity) -> Coroutine | None:
        """A request naming owned objects goes to their key, whatever the strategy, or is refused."""
        owner = dispatch.owner_route(owned, self.state.rotations, self.state.table)
        if isinstance(owner, OpenAIError):
            self._refuse(flow, owner)
            return None
        request = flow.request
        model = self._model_of(flow) if request.method == "POST" else None
        return self._send_first(flow, self._plan(flow, [owner.candidate(model)], model, owner.key_id), owned.owned)

    def _learn(self, flow: http.HTTPFlow) -> None:
        """Which key owns what a successful answer made or answered for (no database round trip:
        the map here changes now, storage through the writer)."""
        referenced = self._referenced.pop(flow.id, ())
        watch = self._streamed.pop(flow.id, None)
        request, response = flow.request, flow.response
        if response is None or not 200 <= response.status_code < 300:
            return
        if not referenced and not affinity.is_object_path(request.path):
            return
        streamed = watch.objects if watch is not None and response.stream else None
        shown = affinity.shown_objects(streamed, response.headers, lambda: response.content)
        learnt = affinity.taught(flow.id, flow.metadata, request.method, referenced, shown, self.state.tenants)
        if learnt is None:
            return
        self.state.learn(learnt)
        if self._writer is not None:
            self._writer.save_ownership(learnt)

    @staticmethod
    def _named(flow: http.HTTPFlow) -> RequestedModel | OpenAIError:
        """The one model the request names (core/request_model.py), as the access addon read it."""
        request = flow.request
        return model_of(
            flow.metadata, request.path, request.headers.fields, request.raw_content, lambda: request.content
        )

    def _model_of(self, flow: http.HTTPFlow) -> str | None:
        named = self._named(flow)
        return named.model if isinstance(named, RequestedModel) else None

    @staticmethod
    def _plan(flow: http.HTTPFlow, candidates: list[Candidate], model: str | None, only_key: int | None = None) -> Plan:
        r = flow.request
        return dispatch.planned(candidates, r.method, r.path, tuple(r.headers.fields), model, only_key)

    def _send_first(self, flow: http.HTTPFlow, plan: Plan, owned: tuple[str, ...] = ()) -> Coroutine | None:
        chosen = dispatch.first_key_now(plan, self.state.rotations.get)
        if chosen is None:
            return self._send_after_wait(flow, plan, owned)
        self._send_with(flow, plan, plan.candidates[chosen[0]], *chosen)
        return None

    async def _send_after_wait(self, flow: http.HTTPFlow, plan: Plan, owned: tuple[str, ...]) -> None:
        chosen = await self.failover.first_key(plan, time.time() + self.state.settings.wait_max_seconds)
        if chosen is None:
            self._refuse(flow, dispatch.no_first_key(plan, self.state.rotations, owned))
        else:
            self._send_with(flow, plan, plan.candidates[chosen[0]], *chosen)

    def _send_with(
        self,
        flow: http.HTTPFlow,
        plan: Plan | None,
        candidate: Candidate,
        index: int,
        key: PoolKey,
        scope: str | None = None,
        scope_known: bool = True,
    ) -> None:
        """The first attempt, on `candidate` with `key`; `scope` is its model (read from the plan when there is one)."""
        access = AccessVerdict.of(flow.metadata)
        if plan is not None:
            scope = dispatch.scope_of(candidate, plan)
        client_id = access.client_id if access else None
        use = flow.metadata[KEYPOOL] = self.failover.begin(candidate, index, key, client_id, scope, scope_known)
        request = flow.request
        target = candidate.group.upstream
        if plan is not None and (not self.state.table.trivial or plan.only_key is not None):
            self._plans[flow.id] = plan
            # The record, the flow list and "copy as curl" show what the client sent (metadata.ClientRequest).
            sent = flow.metadata[CLIENT_REQUEST] = ClientRequest(request.path, plan.request.model)
            if target.base_url is not None or target.dialect != Dialect.OPENAI:
                aim(request, upstream_url(candidate, request.path, reverse_target()))
            use.requested_model = plan.request.model
            renamed = plan.renamed_first(candidate)
            if renamed is not None and plan.request.model and (body := request.content) is not None:
                request.content, sent.renamed = renamed_top_model(body, plan.request.model, renamed), renamed
        outgoing = self._outgoing
        value = placeholder(key.id, key.last4) if outgoing is not None else key.value
        request.headers.fields = with_key(target.dialect, request.headers.fields, value)
        if outgoing is not None:
            outgoing[flow.id] = key.value

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._hide_credential(flow)
        response = flow.response
        if response is None:
            return
        if affinity.watches_stream(flow.request.path, response.status_code, response.headers):
            watch = self._streamed[flow.id] = affinity.ObjectWatch()
            response.stream = chained(response.stream if callable(response.stream) else None, watch)
        candidate = self._answering(flow)
        if dispatch.rename_back(candidate, response.headers) == Rename.EVENTS:
            inner = response.stream if callable(response.stream) else None
            response.stream = chained(inner, EventFilter(functools.partial(dispatch.renamed_back, candidate)))

    def keyrotor_answered(self, flow: http.HTTPFlow) -> Coroutine | None:
        """An answer that may be retried, before any addon's `response` hook (addons/retry_stream.py)."""
        return self.response(flow, finish=False)

    def response(self, flow: http.HTTPFlow, finish: bool = True) -> Coroutine | None:
        use = KeyUse.of(flow.metadata)
        response = flow.response
        if use is None or use.settled or response is None:
            if finish:
                self._finish(flow)
            return None
        status = response.status_code
        plan = self._plans.get(flow.id)
        more_routes = plan is not None and use.candidate + 1 < len(plan.candidates)
        fallback = plan is not None and status == 400 and plan.fallback_after(use.candidate)
        content = response.raw_content if status >= 400 else None
        verdict, judged = self.failover.answered(
            use, more_routes, status, response.headers, content, *self._ask(flow), fallback=fallback
        )
        if judged.missing and plan is not None:
            self.failover.missing(plan.candidates[use.candidate], status, content)
        if verdict == Verdict.REFUSE:
            self._refuse(flow, dispatch.upgrade_refusal(use, self.state.rotations))
        elif verdict != Verdict.ANSWER:
            return self._retry(flow, use, judged.outcome, judged.missing, verdict == Verdict.NEXT_MODEL, finish=finish)
        if finish:
            self._finish(flow)
        return None

    def error(self, flow: http.HTTPFlow) -> Coroutine | None:
        self._hide_credential(flow)
        use = KeyUse.of(flow.metadata)
        if use is None or use.settled or not flow.error:
            self._forget(flow)
            return None
        if self.failover.failed(use, flow.error.msg, *self._ask(flow)) != Verdict.RETRY:
            self._forget(flow)
            return None
        return self._recover(flow, use)

    def _ask(self, flow: http.HTTPFlow) -> tuple[Callable[[], str | None], Callable[[], bool], Callable[[], bool]]:
        """What the decisions may ask of the flow, only when it matters: its model, whether part of
        the answer reached the client, whether it is a WebSocket upgrade."""
        request = flow.request
        return lambda: self._model_of(flow), lambda: reached_client(flow), lambda: is_websocket_upgrade(request)

    async def _recover(self, flow: http.HTTPFlow, use: KeyUse) -> None:
        unanswered = flow.response  # headers of an answer that never arrived whole, or None
        timed_out = flow.error is not None and is_timeout(flow.error.msg)
        await self._retry(flow, use, None, False, timed_out=timed_out)
        if flow.response is not None and flow.response is not unanswered:
            flow.error = None  # recovered: addons/recovery.py sends this response instead of a 502
        elif flow.response is not None:
            flow.response = None  # the client gets mitmproxy's 502, and the record says so

    async def _retry(
        self,
        flow: http.HTTPFlow,
        use: KeyUse,
        outcome: Outcome | None,
        missing: bool,
        too_long: bool = False,
        timed_out: bool = False,
        finish: bool = True,
    ) -> None:
        request = flow.request
        plan = self._plans.get(flow.id)
        if plan is None:  # a single route, nothing renamed: the request as it is now
            model = use.scope if use.scope_known else self._model_of(flow)
            plan = self._plan(flow, [self.state.table.candidates(None)[0]], model)
        plan.request = dispatch.to_resend(plan.request, request.method, request.headers.fields, request.raw_content)
        if self._client is None:  # a hook ran outside running()..done() (unit tests): make one now
            self._client = upstream.new_client(ctx.options.keypool_attempt_timeout_seconds)
        result = await self.failover.retry(
            self._client,
            use,
            plan,
            outcome,
            reverse_target(),
            missing,
            lambda: flow.client_conn.connected,
            too_long,
            timed_out,
            self._first_token,
        )
        answer, streamer = result.answer, self.streamer
        if answer is not None and answer.streaming:  # fed as it comes by addons/retry_stream.py's patch
            if streamer is not None and streamer.installed and not result.refuse and flow.client_conn.connected:
                streamer.pending[flow.id] = answer
            else:
                answer = await answer.whole()  # without the patch, it goes whole
        if answer is not None:
            flow.response = response_of(answer)
            finish = finish and not answer.streaming  # a fed stream: the response hook at its end finishes
            if not answer.streaming:  # it goes to the client whole, now
                flow.metadata[FIRST_BYTE_AT] = answer.ended_at
                if not result.refuse and dispatch.rename_back(result.candidate, flow.response.headers) != Rename.NONE:
                    self._rename_whole(flow.response, result.candidate)
        if result.retry_after is not None and flow.response is not None:
            flow.response.headers["retry-after"] = result.retry_after  # when a key is back, in keyrotor's words
        if result.refuse:
            referenced = self._referenced.get(flow.id, ())
            self._refuse(flow, dispatch.retry_refusal(plan, use, self.state.rotations, referenced, self.state.owners))
        self._plans[flow.id] = plan  # _finish reads which route answered
        if finish:
            self._finish(flow)
        if result.answer is not None and not result.refuse and use.attempts[-1].url:
            # mitmweb shows the flow's request: the one that answered, its key as a placeholder.
            flow.metadata.setdefault(CLIENT_REQUEST, ClientRequest(request.path))
            aim(request, use.attempts[-1].url)
            self._hide_credential(flow)

    @staticmethod
    def _refuse(flow: http.HTTPFlow, error: OpenAIError) -> None:
        """keyrotor's own answer instead of upstream's; the row's error says why."""
        flow.response = http.Response.make(error.status, error.body(), error.all_headers())
        use = KeyUse.of(flow.metadata)
        if use is None:
            # Settled: the response hook must not take keyrotor's own 503 for upstream's and send the
            # request on to another group (the default one, without a plan) it was never routed to.
            use = flow.metadata[KEYPOOL] = KeyUse(settled=True)
        use.refusal = f"{error.code}: {error.message}"

    def _finish(self, flow: http.HTTPFlow) -> None:
        """What a settled answer still needs: the client's model names, and what it teaches about who
        owns which object."""
        self._learn(flow)
        response = flow.response
        candidate = self._answering(flow)
        if (
            response is not None
            and not response.stream
            and dispatch.rename_back(candidate, response.headers) == Rename.WHOLE
        ):
            self._rename_whole(response, candidate)
        self._forget(flow)

    @staticmethod
    def _rename_whole(response: http.Response, candidate: Candidate | None) -> None:
        try:
            body = response.content
        except ValueError:
            return
        if body:
            response.content = dispatch.renamed_back(candidate, body)

    def _answering(self, flow: http.HTTPFlow) -> Candidate | None:
        plan = self._plans.get(flow.id)
        return plan.answering(KeyUse.of(flow.metadata)) if plan is not None else None

    def _forget(self, flow: http.HTTPFlow) -> None:
        self._plans.pop(flow.id, None)
        self._referenced.pop(flow.id, None)
        self._streamed.pop(flow.id, None)

    def _hide_credential(self, flow: http.HTTPFlow) -> None:
        # The request has left: put the placeholder back so no view of the flow shows the key.
        if self._outgoing is not None:
            self._outgoing.pop(flow.id, None)
        use = KeyUse.of(flow.metadata)
        if use is not None and use.key_id is not None:
            dialect = self.state.table.dialect_of(use.group_id)
            headers = flow.request.headers
            headers.fields = with_key(dialect, headers.fields, placeholder(use.key_id, use.key_last4))


def reverse_target() -> str:
    """The reverse-proxy target mitmproxy forwards to (core.routing.reverse_target_of)."""
    return reverse_target_of(ctx.options.mode)
