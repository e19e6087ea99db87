"""The last addon in mitmproxy's chain: puts the real key on the request just before it leaves."""

from __future__ import annotations

from mitmproxy import http

from core.credentials import with_credential


class CredentialSender:
    """Until this hook the request carries a placeholder, so mitmweb's view (which snapshots
    flows in its own request hook, after the scripts') never holds a key value.

    The key pool fills `outgoing` and appends this addon to the master when a view exists.
    """

    def __init__(self) -> None:
        self.outgoing: dict[str, str] = {}  # flow.id → key value; never in flow.metadata

    def request(self, flow: http.HTTPFlow) -> None:
        value = self.outgoing.pop(flow.id, None)
        if value is not None and flow.response is None:
            flow.request.headers.fields = with_credential(flow.request.headers.fields, value)
