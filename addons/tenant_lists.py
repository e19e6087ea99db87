"""Tenancy in lists: GET /v1/files, /v1/batches, /v1/vector_stores... show a client only its own.

Registered right after the key pool, so it filters the answer that reaches the client, retried
or not. Upstream lists every object of the key's project; the answer keeps the caller's
(core/affinity.py decides what is whose), with `first_id`, `last_id` and `has_more` to
match. A page that filtered to nothing while upstream has more is fetched on, with the same
key, until it holds something or upstream has no more: the SDKs page on from the last item
they got, and would stop at an empty page.
"""

from __future__ import annotations

import logging
from collections.abc import Coroutine
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx
from mitmproxy import ctx, http

from core import affinity, upstream
from core.dialects import with_key
from core.metadata import AccessVerdict, KeyUse
from core.routing import Dialect
from core.state import ProxyState

log = logging.getLogger(__name__)

DROPPED = (b"host", b"content-length", b"accept-encoding")  # the follow-ups ask for plain JSON


def requested_limit(query: list[tuple[str, str]]) -> int | None:
    value = dict(query).get("limit")
    try:
        limit = int(value) if value is not None else None
    except ValueError:
        return None
    return limit if limit is not None and limit > 0 else None


class TenantLists:
    def __init__(self, state: ProxyState) -> None:
        self.state = state  # the runtime's: object owners and their clients, the keys
        self._client: httpx.AsyncClient | None = None

    def running(self) -> None:
        self._client = upstream.new_client(float(getattr(ctx.options, "keypool_attempt_timeout_seconds", 60)))

    def done(self) -> None:
        self._client = None

    def response(self, flow: http.HTTPFlow) -> Coroutine | None:
        request, response = flow.request, flow.response
        if response is None or response.status_code != 200 or not affinity.is_list(request.method, request.path):
            return None
        access = AccessVerdict.of(flow.metadata)
        use = KeyUse.of(flow.metadata)
        if access is None or access.client_id is None or use is None or use.key_id is None or use.refusal:
            return None
        client_id, state = access.client_id, self.state
        legacy = state.legacy_allowed(client_id)

        def visible(object_id: str) -> bool:
            return affinity.visible_to(object_id, client_id, state.tenants, legacy)

        try:
            body = response.content or b""
        except ValueError:
            body = b""
        page = affinity.filtered_page(body, visible)
        if page is None:
            # Not a list we can read: nothing of it may reach the client (it would show others' objects).
            response.headers.pop("content-encoding", None)
            response.content = b'{"object": "list", "data": [], "first_id": null, "last_id": null, "has_more": false}'
            response.headers["content-type"] = "application/json"
            return None
        limit = requested_limit(request.query.items(multi=True))
        if page.value["data"] or not page.has_more or page.upstream_last is None:
            self._answer(response, affinity.truncated(page, limit))
            return None
        return self._fill(flow, use, page, limit, visible)

    @staticmethod
    def _answer(response: http.Response, page: affinity.Page) -> None:
        response.headers.pop("content-encoding", None)  # first: the content setter would encode it
        response.content = page.body()

    async def _fill(self, flow: http.HTTPFlow, use: KeyUse, page: affinity.Page, limit: int | None, visible) -> None:
        """Fetch the pages after an empty one, with the key that listed it, until one holds something."""
        assert flow.response is not None
        key = next((k for k in self.state.keys if k.id == use.key_id), None)
        group = self.state.table.by_id.get(use.group_id) if use.group_id is not None else None
        if key is None or self._client is None:
            self._answer(flow.response, page)
            return
        dialect = group.upstream.dialect if group else Dialect.OPENAI
        request = flow.request
        fields = [
            (n, v) for n, v in with_key(dialect, tuple(request.headers.fields), key.value) if n.lower() not in DROPPED
        ]
        parts = urlsplit(request.url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        for _ in range(affinity.MAX_FOLLOW_UPS):
            if page.value["data"] or not page.has_more or page.upstream_last is None:
                break
            url = urlunsplit(parts._replace(query=urlencode(affinity.next_page_query(query, page.upstream_last))))
            try:
                answer = await upstream.send(self._client, "GET", url, fields, None)
            except httpx.HTTPError as e:
                log.warning("a list's next page could not be fetched: %s", upstream.error_text(e))
                break
            more = affinity.filtered_page(answer.content, visible) if answer.status == 200 else None
            if more is None:
                break
            page = affinity.merged_page(page, more)
        self._answer(flow.response, affinity.truncated(page, limit))
