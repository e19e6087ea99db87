"""Token usage for every streamed chat completion, also when the client did not ask for it.

The option goes in on the way up and the usage-only chunk comes out on the way down
(core/usage.py says how and why); capture still records what upstream sent.
"""

from __future__ import annotations

import logging

from mitmproxy import http

from core.metadata import USAGE, UsageInjection
from core.usage import CHAT_COMPLETIONS, UsageChunkFilter, chained, with_usage_requested, without_usage_events

log = logging.getLogger(__name__)


def is_event_stream_ok(response: http.Response) -> bool:
    return 200 <= response.status_code < 300 and "text/event-stream" in response.headers.get("content-type", "")


class Usage:
    def request(self, flow: http.HTTPFlow) -> None:
        request = flow.request
        if flow.response or request.method != "POST" or not request.path.partition("?")[0].endswith(CHAT_COMPLETIONS):
            return
        try:
            body = request.content  # decoded when content-encoded
        except ValueError:
            return  # an encoding we cannot read: leave it to upstream
        if not body or b'"stream"' not in body:
            return
        rewritten = with_usage_requested(body)
        if rewritten is None:
            return
        request.content = rewritten  # re-encoded as the client encoded it; content-length follows
        # Usage chunks are taken out of the stream as it passes: it must arrive uncompressed.
        request.anticomp()
        flow.metadata[USAGE] = UsageInjection()

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        if USAGE not in flow.metadata or response is None or not is_event_stream_ok(response):
            return
        if response.headers.get("content-encoding", "identity").strip().lower() != "identity":
            log.warning(
                "%s %s: upstream compressed the stream despite accept-encoding: identity;"
                " its usage chunk reaches the client",
                flow.request.method,
                flow.request.path,
            )
            return
        inner = response.stream if callable(response.stream) else None  # the key pool may rename models
        response.stream = chained(inner, UsageChunkFilter())

    def response(self, flow: http.HTTPFlow) -> None:
        self._filter_whole(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        # The key pool may have recovered the flow with another attempt's answer.
        if flow.error is None:
            self._filter_whole(flow)

    def _filter_whole(self, flow: http.HTTPFlow) -> None:
        """A stream that arrived whole (a retried attempt's answer) loses its usage chunk too."""
        injection = UsageInjection.of(flow.metadata)
        response = flow.response
        if injection is None or response is None or response.stream or not is_event_stream_ok(response):
            return
        try:
            body = response.content
        except ValueError:
            return
        if not body:
            return
        kept = without_usage_events(body)
        if len(kept) == len(body):
            return
        injection.upstream_body = response.raw_content  # for capture: the row keeps what upstream sent
        response.content = kept
