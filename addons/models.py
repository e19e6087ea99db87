"""GET /v1/models: the models the groups serve, answered here without a key.

When some group serves every model (its list is empty), only upstream knows what that
group offers: the request goes on to the key pool like any other, marked so that the
ModelsMerge addon, after the key pool, adds the models the other groups list to
upstream's answer. With one group for everything (the route table is trivial),
upstream's list is the answer as it is.
"""

from __future__ import annotations

import time

from mitmproxy import http

from core import affinity
from core.metadata import MERGE_MODELS
from core.routing import models_list
from core.state import ProxyState

MODELS_PATH = "/v1/models"


class Models:
    def __init__(self, state: ProxyState) -> None:
        self.state = state  # the runtime's (addons/runtime.py): the route table

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response:
            return
        request = flow.request
        if request.method != "GET" or request.path.partition("?")[0] != MODELS_PATH:
            return
        table = self.state.table
        if table.trivial:
            return
        if affinity.resolve(affinity.referenced_ids(request.path, request.raw_content), self.state.owners).owners:
            return  # it names an owned object: its owner's key answers (addons/keypool.py)
        if any(g.serves_every_model for g in table.groups):
            flow.metadata[MERGE_MODELS] = True
            return
        body = models_list(table.listed_models(), int(time.time()))
        flow.response = http.Response.make(200, body, {"content-type": "application/json"})
