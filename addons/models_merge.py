"""Upstream's answer to GET /v1/models with the groups' own models added.

The Models addon marks the request when a group serves every model and upstream must be
asked; this addon comes right after the key pool, so it sees the answer the client gets,
a retried one included (a retry after a failed exchange ends in the error hook).
"""

from __future__ import annotations

import time

from mitmproxy import http

from core.metadata import MERGE_MODELS
from core.routing import with_listed_models
from core.state import ProxyState


class ModelsMerge:
    def __init__(self, state: ProxyState) -> None:
        self.state = state  # the runtime's (addons/runtime.py): the route table

    def response(self, flow: http.HTTPFlow) -> None:
        if not flow.metadata.get(MERGE_MODELS):
            return
        flow.metadata[MERGE_MODELS] = False  # once: a flow may report a response and then an error
        response = flow.response
        if response is None or response.status_code != 200:
            return
        merged = with_listed_models(response.content or b"", self.state.table.listed_models(), int(time.time()))
        if merged is not None:
            response.content = merged

    def error(self, flow: http.HTTPFlow) -> None:
        if flow.error is None:  # the key pool recovered: its answer goes to the client (addons/recovery.py)
            self.response(flow)
