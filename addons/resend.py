"""Sends a request again, outside mitmproxy's connection, for a retry or a key probe.

mitmproxy has no way to send a flow a second time and stream the new answer to the
original client, so a retry's answer is read whole and then handed to mitmproxy as
the flow's response.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import httpx

# Per connection, never forwarded; httpx sets Host and Content-Length itself.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
     "host", "content-length"}
)  # fmt: skip
RESPONSE_DROPPED = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length"})


@dataclass
class Answer:
    status: int
    reason: bytes
    headers: httpx.Headers
    content: bytes  # as it travelled: still content-encoded
    started_at: float
    first_byte_at: float
    ended_at: float

    def header_fields(self) -> list[tuple[bytes, bytes]]:
        """Headers to hand on with the whole body: framing is redone for the client."""
        fields = [(n, v) for n, v in self.headers.raw if n.lower().decode("latin-1") not in RESPONSE_DROPPED]
        return fields + [(b"content-length", str(len(self.content)).encode())]


def new_client(timeout_seconds: float) -> httpx.AsyncClient:
    client = httpx.AsyncClient(
        timeout=httpx.Timeout(timeout_seconds, connect=min(timeout_seconds, 10.0)),
        follow_redirects=False,
        limits=httpx.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=2.0),
    )
    for name in list(client.headers):  # send exactly the client's headers, not httpx's defaults
        del client.headers[name]
    return client


async def send(
    client: httpx.AsyncClient, method: str, url: str, fields: list[tuple[bytes, bytes]], body: bytes | None
) -> Answer:
    """One attempt; raises httpx.HTTPError (timeouts included) when no whole answer arrives."""
    headers = [(n, v) for n, v in fields if n.lower().decode("latin-1") not in HOP_BY_HOP]
    started = time.time()
    request = client.build_request(method, url, headers=headers, content=body or b"")
    response = await client.send(request, stream=True)
    first_byte = time.time()
    try:
        content = b"".join([chunk async for chunk in response.aiter_raw()])
    finally:
        await response.aclose()
    return Answer(
        status=response.status_code,
        reason=response.reason_phrase.encode("latin-1", "replace"),
        headers=response.headers,
        content=content,
        started_at=started,
        first_byte_at=first_byte,
        ended_at=time.time(),
    )
