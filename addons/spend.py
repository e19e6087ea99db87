"""What an admitted request used: its tokens and cost settle its client's counters as it ends.

Thin over core.limits.Governor (shared with the Access addon, which admitted the request): the
usage upstream reported, streams included, is read as the response ends, before the client
has its last byte, so the client's next request already sees it. A stream that ends without
upstream's usage (its client left mid-way, or between the finish and the usage chunks) is
charged what keyrotor counts itself of what passed (core/tokens.py), and its row says so.
Successful answers carry the client's own x-ratelimit-* headers instead of upstream's, which
describe our pooled key.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from mitmproxy import ctx, http

from core import tokens
from core.limits import Governor, Ticket
from core.metadata import CountedUsage, KeyUse, RequestedModel, UsageInjection
from core.prices import PriceFileError, PriceTable, load_prices
from core.spent import StreamMeter, json_usage
from core.usage import chained

log = logging.getLogger(__name__)

RATELIMIT_PREFIX = "x-ratelimit-"
KEYROTOR_ERROR = "x-keyrotor-error"
NOTHING_USED = {"total_tokens": 0}


class Spend:
    def __init__(self, governor: Governor) -> None:
        self.governor = governor
        self.prices = PriceTable()
        self._meters: dict[str, StreamMeter] = {}  # by flow.id: metadata is deep-copied by mitmweb

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
        self.governor.prices = self.prices  # what USD budgets reserve for a request in flight

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
        # Every stream is metered (it keeps references to the reads, which capture keeps too): one
        # its client leaves is counted for the row, and charged to its client.
        meter = self._meters[flow.id] = StreamMeter()
        response.stream = chained(response.stream if callable(response.stream) else None, meter)
        if ticket is not None and ticket.policy.counts_tokens:
            tokens.warm(self._model(flow, ticket))  # loaded in a thread before a count needs it
        self._own_headers(flow, ticket)

    def response(self, flow: http.HTTPFlow) -> Coroutine[Any, Any, None] | None:
        ticket = self.governor.tickets.get(flow.id)
        meter = self._meters.pop(flow.id, None)
        response = flow.response
        assert response is not None, "the response hook has one"
        ok = 200 <= response.status_code < 300
        if not response.stream:
            meter = None  # it metered an attempt whose answer a retry's, arrived whole, replaced
        if ticket is not None:
            usage = None if ok else NOTHING_USED  # upstream refused it: no tokens, and its estimate goes
            if ok:  # every client's spend is counted, limited or not
                if meter is not None:
                    usage = meter.usage()
                    if usage is None:  # a stream without upstream's usage: counted, off the loop
                        return self._count_and_settle(flow, ticket, meter, left=not meter.ended)
                elif not response.stream and _may_say_usage(response.headers.get("content-type", "")):
                    # A stream that arrived whole (a retry's) may have lost its usage chunk to the Usage addon.
                    injection = UsageInjection.of(flow.metadata)
                    try:
                        body = injection.upstream_body if injection and injection.upstream_body else response.content
                        usage = json_usage(body or b"")
                    except ValueError:
                        usage = None
            self._settle(flow, ticket, usage)
        if ok and not response.stream:
            self._own_headers(flow, ticket)
        return None

    def error(self, flow: http.HTTPFlow) -> Coroutine[Any, Any, None] | None:
        if flow.error is None:
            return None  # the key pool recovered it with another attempt's answer: its response hook settles it
        meter = self._meters.pop(flow.id, None)
        ticket = self.governor.tickets.get(flow.id)
        usage = None
        response = flow.response
        if meter is not None and response is not None and response.stream and 200 <= response.status_code < 300:
            # The client left (or the stream broke) before its end. Upstream's connection is already
            # closing; what upstream generated until then is charged, and its row says so.
            usage = meter.usage()
            if usage is None:
                return self._count_and_settle(flow, ticket, meter, left=True)
        if ticket is not None:
            self._settle(flow, ticket, usage)
        return None

    async def _count_and_settle(
        self, flow: http.HTTPFlow, ticket: Ticket | None, meter: StreamMeter, left: bool
    ) -> None:
        """keyrotor's own count of a stream that ended without upstream's usage, then the settlement.

        Counted in a thread: the loop goes on meanwhile (closing upstream's connection among
        others), and loading a tokenizer the first time takes a second. The request's
        reservation holds its budget until it settles.
        """
        try:
            request_body = flow.request.content or b""
        except ValueError:
            request_body = flow.request.raw_content or b""
        counted = await asyncio.to_thread(tokens.counted, request_body, meter.passed(), self._model(flow, ticket))
        if left:
            flow.metadata[CountedUsage.KEY] = CountedUsage(
                counted.prompt_tokens, counted.completion_tokens, counted.how, counted.note()
            )
        if ticket is not None:
            self._settle(flow, ticket, counted.usage())

    def _settle(self, flow: http.HTTPFlow, ticket: Ticket, usage: dict | None) -> None:
        cost = None
        if usage is not None:
            model = self._model(flow, ticket)
            cost = self.prices.cost(model, usage.get("prompt_tokens"), usage.get("completion_tokens"))
        self.governor.settle(flow.id, usage, cost, time.time())

    @staticmethod
    def _model(flow: http.HTTPFlow, ticket: Ticket | None) -> str | None:
        keys = KeyUse.of(flow.metadata)
        return (keys.fallback_model if keys else None) or (ticket.model if ticket else None) or _model(flow)

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


def _may_say_usage(content_type: str) -> bool:
    """JSON answers and streams (a retry's arrives whole) say what they used; a file or audio download,
    which may be large and compressed, is not decoded and searched on the loop."""
    return "json" in content_type or "event-stream" in content_type


def _model(flow: http.HTTPFlow) -> str | None:
    named = RequestedModel.of(flow.metadata)  # read once, by the access addon (core/request_model.py)
    return named.model if named is not None else None
