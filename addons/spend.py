"""What an admitted request used: its tokens and cost settle its client's counters as it ends.

Thin over core.limits.Governor (shared with the Access addon, which admitted the request): the
usage upstream reported, streams included, is read as the response ends, before the client
has its last byte, so the client's next request already sees it. Successful answers carry the
client's own x-ratelimit-* headers instead of upstream's, which describe our pooled key.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from mitmproxy import ctx, http

from core.limits import Governor, Ticket
from core.metadata import KeyUse, RequestedModel
from core.prices import PriceFileError, PriceTable, load_prices
from core.spent import UsageTail, json_usage
from core.usage import chained

log = logging.getLogger(__name__)

RATELIMIT_PREFIX = "x-ratelimit-"
KEYROTOR_ERROR = "x-keyrotor-error"
NOTHING_USED = {"total_tokens": 0}


class Spend:
    def __init__(self, governor: Governor) -> None:
        self.governor = governor
        self.prices = PriceTable()
        self._tails: dict[str, UsageTail] = {}  # by flow.id: metadata is deep-copied by mitmweb

    def configure(self, updated: set[str]) -> None:
        if "capture_prices" in updated:
            self._load_prices()

    def running(self) -> None:
        self._load_prices()

    def _load_prices(self) -> None:
        path = getattr(ctx.options, "capture_prices", None)
        if not path:
            return
        try:
            self.prices = load_prices(Path(path).expanduser())
        except PriceFileError as e:
            log.warning("cost budgets cannot be counted: %s", e)  # the capture addon refuses to start on it

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        # Only a successful stream, whose headers leave right after this hook; a whole answer is
        # done in `response`, after the key pool has read upstream's headers (a 429's reset times).
        if (
            response is None
            or not 200 <= response.status_code < 300
            or "text/event-stream" not in response.headers.get("content-type", "")
        ):
            return
        if KEYROTOR_ERROR in response.headers:
            return
        ticket = self.governor.tickets.get(flow.id)
        if ticket is not None and ticket.policy.counts_tokens:
            tail = self._tails[flow.id] = UsageTail()
            response.stream = chained(response.stream if callable(response.stream) else None, tail)
        self._own_headers(flow, ticket)

    def response(self, flow: http.HTTPFlow) -> None:
        ticket = self.governor.tickets.get(flow.id)
        tail = self._tails.pop(flow.id, None)
        response = flow.response
        assert response is not None, "the response hook has one"
        ok = 200 <= response.status_code < 300
        if ticket is not None:
            usage = None if ok else NOTHING_USED  # upstream refused it: no tokens, and its estimate goes
            if ticket.policy.counts_tokens and ok:
                if tail is not None:
                    usage = tail.usage()
                elif not response.stream:
                    try:
                        usage = json_usage(response.content or b"")
                    except ValueError:
                        usage = None
            self._settle(flow, ticket, usage)
        if ok and not response.stream:
            self._own_headers(flow, ticket)

    def error(self, flow: http.HTTPFlow) -> None:
        self._tails.pop(flow.id, None)
        ticket = self.governor.tickets.get(flow.id)
        if ticket is not None:
            self._settle(flow, ticket, None)

    def _settle(self, flow: http.HTTPFlow, ticket: Ticket, usage: dict | None) -> None:
        cost = None
        if usage is not None and (ticket.policy.daily_usd is not None or ticket.policy.monthly_usd is not None):
            keys = KeyUse.of(flow.metadata)
            model = (keys.fallback_model if keys else None) or ticket.model or _model(flow)
            cost = self.prices.cost(model, usage.get("prompt_tokens"), usage.get("completion_tokens"))
        self.governor.settle(flow.id, usage, cost, time.time())

    def _own_headers(self, flow: http.HTTPFlow, ticket: Ticket | None) -> None:
        """Upstream's x-ratelimit-* out (they describe the pooled key), the client's own in."""
        response = flow.response
        if response is None or KEYROTOR_ERROR in response.headers:
            return
        fields = response.headers.fields
        own = self.governor.rate_headers(ticket.client_id, ticket.policy, time.time()) if ticket is not None else {}
        if own or any(name[:12].lower() == b"x-ratelimit-" for name, _ in fields):
            # One assignment: setting each header would scan and re-encode the fields six times.
            kept = tuple(f for f in fields if f[0][:12].lower() != b"x-ratelimit-")
            response.headers.fields = kept + tuple((k.encode(), v.encode()) for k, v in own.items())


def _model(flow: http.HTTPFlow) -> str | None:
    named = RequestedModel.of(flow.metadata)  # read once, by the access addon (core/request_model.py)
    return named.model if named is not None else None
