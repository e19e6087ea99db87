"""The client's labels: `x-keyrotor-tags` and `x-keyrotor-session`, recorded with its flow, never sent upstream.

Right after Access: the headers come off every request (refused or not) before any other
addon sees it, so no retry, probe or mitmweb replay carries them upstream. An admitted
client's labels go to the flow's metadata, where Capture reads them; a bad value is
refused with an OpenAI-shaped 400 (core/tags.py) before the body is read.
"""

from __future__ import annotations

from mitmproxy import http

from core.metadata import AccessVerdict, FlowLabels
from core.tags import HEADERS, LabelError, labels_of, without_labels


class Tags:
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self._take(flow)

    def request(self, flow: http.HTTPFlow) -> None:
        self._take(flow)  # a flow that skipped requestheaders (replayed, injected) or got its headers back

    @staticmethod
    def _take(flow: http.HTTPFlow) -> None:
        headers = flow.request.headers
        fields = headers.fields
        if not any(name.lower() in HEADERS for name, _ in fields):
            return
        headers.fields = without_labels(fields)
        verdict = AccessVerdict.of(flow.metadata)
        if flow.response is not None or verdict is None or not verdict.admitted:
            return  # refused already: nothing of it is recorded as the client's
        try:
            labels = labels_of(fields)
        except LabelError as e:
            error = e.error()
            verdict.rejected = error.code
            verdict.reason = f"{error.code}: {error.message}"
            flow.response = http.Response.make(error.status, error.body(), error.all_headers())
            return
        if labels is not None:
            flow.metadata[FlowLabels.KEY] = FlowLabels(list(labels.tags), labels.session)
