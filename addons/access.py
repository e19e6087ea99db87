"""Who is calling: every request must carry a client key that keyrotor issued, within its client's limits.

Thin over core.limits: at the headers it authenticates and checks expiry and address, at
the body it asks the Governor for a verdict (model allowlist, budgets, rate limits) and
answers a refusal itself; nothing refused reaches upstream. The Spend addon settles what
an admitted request used when it ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import Any

from mitmproxy import ctx, exceptions, http
from mitmproxy.addonmanager import Loader

from config import ConfigError, Settings, checked_options, default_of
from core.addresses import Network, client_address, is_trusted, parse_networks
from core.credentials import credential_from, hash_client_key, masked, query_credential, refused_placeholder, scrubbed
from core.dispatch import key_of
from core.errors import OpenAIError
from core.limits import Governor, Refusal, Ticket, is_upload, upload_refusal
from core.metadata import ACCESS, AccessVerdict, ClientSent, RequestedModel
from core.models import Client
from core.passes import FLOW_HEADER, PASS_HEADER_BYTES, SpentPasses, pass_from, verify
from core.ports import AdminKeys
from core.request_model import model_of
from core.routing import RouteTable
from core.state import ProxyState

log = logging.getLogger(__name__)


def refusal(verdict: AccessVerdict) -> OpenAIError:
    if verdict.rejected == "missing_api_key":
        message = (
            "You didn't provide an API key. Send the key keyrotor issued to you as"
            " 'Authorization: Bearer <key>' (the api_key of your OpenAI client)."
        )
    else:
        message = (
            f"Incorrect API key provided: {verdict.masked}. Use a key issued by this keyrotor"
            " gateway (run.py clients add NAME); upstream keys are not accepted here."
        )
    return OpenAIError(401, message, "invalid_request_error", verdict.rejected)


def pass_refusal(ambiguous: bool) -> OpenAIError:
    if ambiguous:
        message = "This request carries both a client key and an x-keyrotor-pass: send one of them."
        return OpenAIError(401, message, "invalid_request_error", "ambiguous_credentials")
    message = (
        "The x-keyrotor-pass is not valid: forged, expired, already used, or its client is disabled or has no"
        " active key. The monitor UI makes a new one for each request it sends."
    )
    return OpenAIError(401, message, "invalid_request_error", "invalid_api_key")


def pin_refusal(client: Client, pinned: str | None, group: str | None) -> Refusal | None:
    """Why a pass may not pin the group `group` (its label; None: none found for the pin `pinned`)."""
    headers = {"x-should-retry": "false"}
    if pinned is not None and group is None:
        message = f"The {pinned} this request is pinned to does not exist (any more)."
        return Refusal(
            "group_not_found", OpenAIError(404, message, "invalid_request_error", "group_not_found", headers)
        )
    if group is not None and client.policy.groups and group not in client.policy.groups:
        message = f"This client may not use the upstream group {group} (allowed: {', '.join(client.policy.groups)})."
        return Refusal(
            "group_not_allowed", OpenAIError(403, message, "invalid_request_error", "group_not_allowed", headers)
        )
    return None


class Access:
    def __init__(
        self,
        defaults: Settings | None = None,
        state: ProxyState | None = None,
        governor: Governor | None = None,
        admin_keys: AdminKeys | None = None,
    ) -> None:
        self._defaults = defaults
        # Where the key that signs the UI's passes comes from (core/passes.py), and the passes used.
        self._admin_keys = admin_keys
        self._pass_key: bytes | None = None
        self._spent = SpentPasses()
        # The runtime's (addons/runtime.py): clients by key hash, and the route table, for clients
        # limited to some groups (which groups serve a model).
        self.state = state if state is not None else ProxyState()
        self._serving: dict[str, tuple[str, ...]] = {}  # model → labels of the groups that serve it
        self._serving_in: RouteTable | None = None  # the table `_serving` was made from
        # Shared with the Spend addon (the runtime builds it, with its counters). Without one (the
        # options alone), one without counters, like the runtime's until storage opens.
        self.governor = governor or Governor(counters=None)  # type: ignore[arg-type]
        self._trusted: tuple[Network, ...] = ()  # access.trusted_proxies, parsed

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "access_ip_rpm",
            int,
            default_of(self._defaults, "access.ip_rpm"),
            "Requests per minute from one client address, across all clients (0: no limit).",
        )
        loader.add_option(
            "access_trusted_proxies",
            str,
            default_of(self._defaults, "access.trusted_proxies"),
            "Reverse proxies in front of the proxy whose X-Forwarded-For names the client (empty: none).",
        )

    def configure(self, updated: set[str]) -> None:
        try:
            checked = checked_options(ctx.options, updated, ["access.ip_rpm", "access.trusted_proxies"])
        except ConfigError as e:
            raise exceptions.OptionsError(str(e)) from None
        if "access_ip_rpm" in updated:
            self.governor.ip_rpm = ctx.options.access_ip_rpm
        if "access.trusted_proxies" in checked:
            self._trusted = parse_networks(checked["access.trusted_proxies"])

    @property
    def clients(self) -> dict[str, tuple[Client, int]]:
        """Enabled clients by key hash → (client, key id)."""
        return self.state.clients

    @property
    def by_id(self) -> dict[int, Client]:
        return self.state.clients_by_id

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        # Checked as soon as the headers arrive, so every credential is replaced by a placeholder
        # before any other addon (mitmweb's view snapshots flows here) sees it, and a refusal is
        # answered before the body is read (addons/bounds.py sends it without reading on).
        request = flow.request
        query_key = None
        if "?" in request.path:
            query_key, path = query_credential(request.path)
            if path != request.path:
                request.path = path  # a key in the URL goes no further: not upstream, not into a record
        headers = request.headers
        address = self._address(flow)
        key = credential_from(headers.fields) or query_key
        token = pass_from(headers.fields)
        if token is not None:
            self._by_pass(flow, token, key, address)
            return
        found = self.state.clients.get(hash_client_key(key)) if key else None
        if found is None:
            rejected = "invalid_api_key" if key else "missing_api_key"
            verdict = AccessVerdict(rejected=rejected, masked=masked(key) if key else None, address=address)
            error = refusal(verdict)
            verdict.reason = f"{rejected}: {error.message}"
            flow.metadata[ACCESS] = verdict
            headers.fields = scrubbed(headers.fields, refused_placeholder(key))
            flow.response = as_response(error)
            return
        client, key_id = found
        verdict = flow.metadata[ACCESS] = AccessVerdict(
            client_id=client.id, client_name=client.name, key_id=key_id, address=address
        )
        stand_in = f"[client key #{key_id}]"
        headers.fields = scrubbed(headers.fields, stand_in, ensure=True)
        policy = client.policy
        if policy.expires_at is not None or client.networks:
            refused = Governor.check_key(policy, client.networks, address, time.time())
            if refused is not None:
                refuse(flow, verdict, refused)

    def _address(self, flow: http.HTTPFlow) -> str | None:
        """The client's address. A trusted proxy's X-Forwarded-For names it; that header was meant for
        keyrotor alone, so it goes no further: upstream never learns the clients' addresses."""
        peer = flow.client_conn.peername
        if peer is None:
            return None
        if not self._trusted or not is_trusted(peer[0], self._trusted):
            return peer[0]
        headers = flow.request.headers
        forwarded = headers.get_all("x-forwarded-for")
        if forwarded:
            del headers["x-forwarded-for"]
        return client_address(peer[0], forwarded, self._trusted)

    def _by_pass(self, flow: http.HTTPFlow, token: str, key: str | None, address: str | None) -> None:
        """A request the monitor UI sends under a client (core/passes.py): the pass goes no further."""
        headers = flow.request.headers
        fields = tuple((n, v) for n, v in headers.fields if n.lower() != PASS_HEADER_BYTES)
        now = time.time()
        signing_key = self._signing_key()
        found = verify(signing_key, token, now) if key is None and signing_key else None
        client = self.state.clients_by_id.get(found.client_id) if found is not None else None
        if found is None or client is None or not self._spent.spend(found, now):
            error = pass_refusal(ambiguous=key is not None)
            flow.metadata[ACCESS] = AccessVerdict(
                rejected=error.code, reason=f"{error.code}: {error.message}", address=address
            )
            headers.fields = scrubbed(fields, "[refused pass]")
            flow.response = as_response(error)
            return
        # Its usage counts on the client's first active key, as the client's own requests count on theirs.
        key_id = min((k for c, k in self.state.clients.values() if c.id == client.id), default=None)
        verdict = flow.metadata[ACCESS] = AccessVerdict(
            client_id=client.id,
            client_name=client.name,
            key_id=key_id,
            pinned_group=found.group_id,
            pinned_key=found.key_id,
            replay_of=found.replay_of,
            by_pass=True,
            address=address,
        )
        headers.fields = scrubbed(fields, f"[pass for client #{client.id}]", ensure=True)
        # The client's own rules, but for its address list: the request comes from the UI, not the client.
        refused = Governor.check_key(client.policy, (), None, now) if client.policy.expires_at is not None else None
        refused = refused or pin_refusal(client, *self._pinned_label(found.group_id, found.key_id))
        if refused is not None:
            refuse(flow, verdict, refused)

    def _signing_key(self) -> bytes | None:
        if self._pass_key is None and self._admin_keys is not None:
            self._pass_key = self._admin_keys.pass_key()
        return self._pass_key

    def _pinned_label(self, group_id: int | None, key_id: int | None) -> tuple[str | None, str | None]:
        """(what was pinned, if it is gone: else None; the label of the group the request is pinned to)."""
        if group_id is None and key_id is not None:
            _, key = key_of(self.state.rotations, key_id)
            group_id = key.group_id if key is not None else None  # a key gone: the pool, as routed
        if group_id is None:
            return None, None
        group = self.state.table.by_id.get(group_id)
        return (None if group is not None else f"upstream group #{group_id}"), (group.label if group else None)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        _name_flow(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        _name_flow(flow)  # keyrotor's own answers (a refusal) have no responseheaders hook

    def request(self, flow: http.HTTPFlow) -> Coroutine[Any, Any, None] | None:
        if flow.response:
            return None
        if ACCESS not in flow.metadata:
            self.requestheaders(flow)  # a flow that skipped the requestheaders hook (replayed, injected)
            if flow.response:
                return None
        verdict = AccessVerdict.of(flow.metadata)
        if verdict is None or verdict.client_id is None:
            return None  # refused at the headers, and answered
        request = flow.request
        # References only: the record compares them with what goes upstream (core/rewrites.py).
        flow.metadata[ClientSent.KEY] = ClientSent(request.path, request.headers.fields, request.raw_content)
        # The one model upstream will act on, for every client: read once here, where a request that
        # names it ambiguously is refused before anything is sent; the other addons read it back.
        named = model_of(
            flow.metadata, request.path, request.headers.fields, request.raw_content, lambda: request.content
        )
        if not isinstance(named, RequestedModel):
            refuse(flow, verdict, Refusal(named.code or "invalid_model", named))
            return None
        client = self.state.clients_by_id.get(verdict.client_id)
        if client is None:
            return None
        if not client.policy.is_limited and not self.governor.ip_rpm:
            self.governor.count(flow.id, client.id, client.policy, named.model, time.time())  # its spend only
            return None
        body = request.raw_content or b""
        if body[:1] not in (b"{", b" ", b"\n", b"\r", b"\t", b"-", b""):
            try:
                body = request.content or b""  # content-encoded: the estimate counts the real prompt
            except ValueError:
                pass  # an encoding we cannot read: refused above
        if client.policy.models and is_upload(request.method, request.path):  # a batch's input file names models too
            return self._admit_upload(flow, verdict, client, named, body)
        self._admit(flow, verdict, client, named, body)
        return None

    async def _admit_upload(
        self, flow: http.HTTPFlow, verdict: AccessVerdict, client: Client, named: RequestedModel, body: bytes
    ) -> None:
        # A batch's input file may be a hundred MB, 30 ms a MB to read: read off the loop, so no
        # other request waits on it (the hook returns a coroutine only here).
        content_type = flow.request.headers.get("content-type", "")
        refused = await asyncio.to_thread(upload_refusal, client.policy.models, flow.request.path, content_type, body)
        if refused is not None:
            refuse(flow, verdict, refused)
            return
        self._admit(flow, verdict, client, named, body)

    def _admit(
        self, flow: http.HTTPFlow, verdict: AccessVerdict, client: Client, named: RequestedModel, body: bytes
    ) -> None:
        """The Governor's verdict on the request: refused, or counted against the client's limits."""
        request = flow.request
        policy = client.policy
        model, serving = named.model, None
        if policy.groups and model is not None:
            table = self.state.table
            if table is not self._serving_in:  # the routes changed
                self._serving, self._serving_in = {}, table
            serving = self._serving.get(model)
            if serving is None:  # made once per model and route change, not per request
                serving = self._serving[model] = tuple(g.label for g in table.groups_for(model))
            verdict.groups = list(policy.groups)
        outcome = self.governor.admit(
            flow.id, client.id, policy, model, body, verdict.address, time.time(), serving, request.path
        )
        if isinstance(outcome, Refusal):
            refuse(flow, verdict, outcome)
        elif isinstance(outcome, Ticket):
            verdict.counted = True


def _name_flow(flow: http.HTTPFlow) -> None:
    """The UI's requests (a pass) learn which flow they are, to find its record (monitor_ui/through_proxy.py)."""
    response = flow.response
    if response is None:
        return
    verdict = AccessVerdict.of(flow.metadata)
    if verdict is not None and verdict.by_pass:
        response.headers[FLOW_HEADER] = flow.id  # set, not kept: upstream's own x-keyrotor-flow names nothing


def refuse(flow: http.HTTPFlow, verdict: AccessVerdict, refused: Refusal) -> None:
    """Answer the request with the refusal; the flow's row records its code and why."""
    verdict.rejected = refused.code
    verdict.reason = refused.reason
    flow.response = as_response(refused.error)


def as_response(error: OpenAIError) -> http.Response:
    return http.Response.make(error.status, error.body(), error.all_headers())
