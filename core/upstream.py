"""keyrotor's own requests upstream, outside mitmproxy's connection: retries and key probes.

mitmproxy has no way to send a flow a second time and stream the new answer to the
original client, so a retry's answer is read whole and then handed to mitmproxy as
the flow's response. A probe is GET /v1/models, which costs no tokens.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import httpx

from core.classify import OK, Outcome, classify_response, connection_failure
from core.credentials import EchoFilter, encoded_echo
from core.dialects import models_url, with_key
from core.routing import Dialect, Upstream

# Per connection, never forwarded; httpx sets Host and Content-Length itself.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "host",
        "content-length",
    }
)
RESPONSE_DROPPED = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length"})
PROBE_TIMEOUT_SECONDS = 30.0


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

    def without_echo(self, value: str, stand_in: str) -> Answer:
        """The answer with `value` (the key it was sent with) replaced by `stand_in` wherever
        upstream quoted it; a compressed body is looked into too, and handed on decoded when it did."""
        echo = EchoFilter(value.encode(), stand_in.encode())
        fields = echo.fields(tuple(self.headers.raw))
        content = echo.feed(self.content) + echo.flush()
        encoding = self.headers.get("content-encoding", "")
        if encoding and (plain := encoded_echo(content, encoding, echo.secret, echo.replacement)) is not None:
            content = plain
            fields = tuple((n, v) for n, v in fields if n.lower() != b"content-encoding")
            echo.replaced = True
        if not echo.replaced:
            return self
        return dataclasses.replace(self, headers=httpx.Headers(list(fields)), content=content)


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


def error_text(error: httpx.HTTPError) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _models_request(upstream: Upstream, default_base_url: str, value: str) -> tuple[str, list[tuple[bytes, bytes]]]:
    url = models_url(upstream.dialect, upstream.base_url or default_base_url, upstream.api_version)
    return url, list(with_key(upstream.dialect, (), value))


async def probe(client: httpx.AsyncClient, upstream: Upstream, default_base_url: str, value: str) -> Outcome:
    """The outcome of one GET /v1/models (Azure: /openai/models) with key `value` at `upstream`."""
    url, headers = _models_request(upstream, default_base_url, value)
    try:
        response = await client.get(url, headers=headers)
    except httpx.HTTPError as e:
        return connection_failure(f"{type(e).__name__}: {e}")
    # Anything but a key failure (a 404 from a server without /v1/models, say) means the key got in.
    outcome = classify_response(response.status_code, response.headers, response.content, time.time())
    return outcome if outcome is not None and outcome.is_key_failure else OK


class ModelListError(Exception):
    """Upstream did not list its models; the message says what it answered."""


AZURE_LISTS_NO_DEPLOYMENTS = (
    "Azure lists the models a resource can deploy, not its deployments: add each deployment by hand"
    " with `run.py models add UPSTREAM/GROUP MODEL --as DEPLOYMENT`."
)


async def list_models(client: httpx.AsyncClient, upstream: Upstream, default_base_url: str, value: str) -> list[str]:
    """The model ids upstream's model list gives for key `value`.

    Never for Azure: its /openai/models names models, and a model id taken for a deployment name
    would route requests to a deployment that does not exist.
    """
    if upstream.dialect == Dialect.AZURE:
        raise ModelListError(AZURE_LISTS_NO_DEPLOYMENTS)
    url, headers = _models_request(upstream, default_base_url, value)
    try:
        response = await client.get(url, headers=headers)
    except httpx.HTTPError as e:
        raise ModelListError(error_text(e)) from None
    if response.status_code != 200:
        raise ModelListError(f"{response.status_code} from {url.split('?')[0]}")
    try:
        data = response.json()["data"]
        return sorted({item["id"] for item in data if isinstance(item, dict) and isinstance(item.get("id"), str)})
    except (ValueError, KeyError, TypeError):
        raise ModelListError(f"{url.split('?')[0]} answered something that is not a model list") from None
