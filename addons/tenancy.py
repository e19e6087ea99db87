"""Tenancy: a client names only its own objects.

Files, batches, stored responses, vector stores... belong to the client whose request made
them, as well as to the upstream key (core/affinity.py). A request naming another client's
object, in its path or its body, is answered here as upstream answers an id it does not
hold (its own 404, in the object kind's words), before a key is picked or anything is sent;
the refusal goes to the audit log through the writer. Objects no client made (made upstream
directly, or before clients owned objects) are reachable only by clients an admin allows
(`run.py clients set NAME --legacy-objects`). Lists are filtered by addons/tenant_lists.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine

from mitmproxy import http

from core import affinity
from core.metadata import KEYPOOL, AccessVerdict, KeyUse
from core.ports import RefusalSink
from core.state import ProxyState

requests_log = logging.getLogger("keyrotor.requests")  # one request's line: the console shows it with --verbose


class Tenancy:
    def __init__(self, state: ProxyState, writer: RefusalSink | None = None) -> None:
        self.state = state  # the runtime's: object owners and their clients, the clients
        self._writer = writer  # the runtime's: refusals go to the audit log off the loop

    def request(self, flow: http.HTTPFlow) -> Coroutine | None:
        if flow.response:
            return None
        access = AccessVerdict.of(flow.metadata)
        if access is None or not access.admitted or access.client_id is None:
            return None
        request = flow.request
        referenced = affinity.referenced_once(flow.metadata, request.path, request.raw_content)
        if not referenced:
            return None
        state = self.state
        client_id = access.client_id
        foreign = affinity.foreign_ids(referenced, client_id, state.tenants, state.legacy_allowed(client_id))
        if not foreign:
            return None
        if state.attached and any(i not in state.owners for i in foreign):
            return self._check_after_reading(flow, access, referenced)
        self._refuse(flow, access, foreign)
        return None

    async def _check_after_reading(
        self, flow: http.HTTPFlow, access: AccessVerdict, referenced: tuple[str, ...]
    ) -> None:
        """An id this process has not heard of may have been made through another proxy on the same
        storage a moment ago: storage is read once before the request is refused."""
        state = self.state
        owners, tenants, last = await asyncio.to_thread(state.read_owners)
        state.apply_owners(owners, tenants, last)
        assert access.client_id is not None
        legacy = state.legacy_allowed(access.client_id)
        foreign = affinity.foreign_ids(referenced, access.client_id, state.tenants, legacy)
        if foreign:
            self._refuse(flow, access, foreign)

    def _refuse(self, flow: http.HTTPFlow, access: AccessVerdict, foreign: tuple[str, ...]) -> None:
        request = flow.request
        answer = affinity.not_found(foreign[0], request.path, request.raw_content)
        flow.response = http.Response.make(answer.status, answer.body(), answer.headers())
        use = KeyUse.of(flow.metadata)
        if use is None:
            use = flow.metadata[KEYPOOL] = KeyUse()
        use.refusal = f"object_not_found: client #{access.client_id} named objects not its own"
        requests_log.info("client #%s named objects not its own: %s", access.client_id, ", ".join(foreign[:5]))
        if self._writer is not None and access.client_id is not None:
            self._writer.save_refusal(
                affinity.TenantRefusal(
                    access.client_id, access.client_name, foreign, request.method, request.path, flow.id, time.time()
                )
            )
