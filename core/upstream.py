"""keyrotor's own requests upstream, outside mitmproxy's connection: retries and key probes.

mitmproxy has no way to send a flow a second time, so a retry goes out with httpx. A retried
event stream is read up to its first chunk (within the first-token limit) and handed on with the
rest still to read, which addons/retry_stream.py feeds through mitmproxy's own stream, chunk by
chunk; any other answer is read whole. A probe is GET /v1/models, which costs no tokens.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

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
    first_byte_at: float  # its headers came
    ended_at: float  # its body came whole; a stream: its first chunk came
    # A stream's body after `content` (its first chunk), still to read, and how to let it go.
    rest: AsyncIterator[bytes] | None = None
    close: Callable[[], Awaitable[None]] | None = None
    # (key value, its placeholder): a stream's echo is replaced as it passes (addons/credential_sender.py).
    echo: tuple[str, str] | None = field(default=None, repr=False)

    @property
    def streaming(self) -> bool:
        return self.rest is not None

    async def read_rest(self) -> Answer:
        """The answer whole: a stream's rest read to its end."""
        if self.rest is None:
            return self
        try:
            content = self.content + b"".join([chunk async for chunk in self.rest])
        finally:
            await self.discard()
        return dataclasses.replace(self, content=content, rest=None, close=None, ended_at=time.time())

    async def whole(self) -> Answer:
        """The answer whole, its key's echo replaced: a stream nobody feeds to the client as it comes."""
        answer = await self.read_rest()
        echo, answer.echo = answer.echo, None
        return answer.without_echo(*echo) if echo is not None else answer

    async def discard(self) -> None:
        """Stop reading a stream: its connection upstream closes."""
        close, self.rest, self.close = self.close, None, None
        if close is not None:
            await close()

    def header_fields(self) -> list[tuple[bytes, bytes]]:
        """Headers to hand on: a stream's as upstream framed it, a whole body's framed anew for the client."""
        if self.streaming:
            return list(self.headers.raw)
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


class StreamHandoff(Protocol):
    """Where the key pool leaves a retried stream to be fed to the client as it comes
    (addons/retry_stream.py): `pending` maps flow id → the answer, `installed` says the patch is in."""

    pending: dict[str, Answer]
    installed: bool


def new_client(timeout_seconds: float) -> httpx.AsyncClient:
    client = httpx.AsyncClient(
        timeout=httpx.Timeout(timeout_seconds, connect=min(timeout_seconds, 10.0)),
        follow_redirects=False,
        limits=httpx.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=2.0),
    )
    for name in list(client.headers):  # send exactly the client's headers, not httpx's defaults
        del client.headers[name]
    return client


def is_stream(status: int, headers: httpx.Headers) -> bool:
    """A successful event stream: handed on as it arrives."""
    return 200 <= status < 300 and "text/event-stream" in headers.get("content-type", "")


class FirstTokenTimeout(httpx.ReadTimeout):
    """A stream whose first chunk did not come within the first-token limit: a silent attempt."""


async def send(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    fields: list[tuple[bytes, bytes]],
    body: bytes | None,
    first_token_seconds: float = 0.0,
) -> Answer:
    """One attempt; raises httpx.HTTPError (timeouts included) when no answer arrives: a whole one,
    or a successful event stream's headers and first chunk (its `rest` is then the caller's to read
    or discard). `first_token_seconds` (0: none) bounds a stream's first chunk from the request's start."""
    headers = [(n, v) for n, v in fields if n.lower().decode("latin-1") not in HOP_BY_HOP]
    started = time.time()
    request = client.build_request(method, url, headers=headers, content=body or b"")
    response = await client.send(request, stream=True)
    first_byte = time.time()
    if is_stream(response.status_code, response.headers):
        return await _first_chunk(response, started, first_byte, first_token_seconds)
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


async def _first_chunk(response: httpx.Response, started: float, first_byte: float, limit: float) -> Answer:
    chunks = response.aiter_raw()
    try:
        wait = max(0.0, limit - (time.time() - started)) if limit else None
        try:
            first = await asyncio.wait_for(anext(chunks, b""), wait)
        except TimeoutError:
            raise FirstTokenTimeout(f"upstream timed out: no first token for {limit:g} s") from None
    except BaseException:
        await response.aclose()
        raise
    answer = Answer(
        status=response.status_code,
        reason=response.reason_phrase.encode("latin-1", "replace"),
        headers=response.headers,
        content=first,
        started_at=started,
        first_byte_at=first_byte,
        ended_at=time.time(),
    )
    if first:
        answer.rest, answer.close = chunks, response.aclose
    else:  # ended before any byte: whole
        await response.aclose()
    return answer


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
