"""Which upstream key: pick one, swap it in, learn from upstream's answer, retry on another key.

The first attempt of every request goes through mitmproxy itself, so a good answer
streams to the client unbuffered. When that attempt fails because of its key (401,
403, 429, 5xx, connection error) and nothing has reached the client yet, core's
rotation sends the request again with another key and the answer is handed to the
client whole. The client sees an error only when no key could serve it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from pathlib import Path

import httpx
from mitmproxy import ctx, exceptions, http

from config import STRATEGIES, default_of
from core import upstream
from core.classify import Outcome, classify_response, connection_failure
from core.credentials import placeholder, with_credential
from core.errors import OpenAIError
from core.metadata import KEYPOOL, KeyUse
from core.models import PoolKey
from core.pool import Policy
from core.revisions import watch_revision
from core.rotation import Outgoing, Rotation, RotationSettings
from storage import db, secrets, writer
from storage.upstream_keys import load_pool

log = logging.getLogger(__name__)

# The whole-number options, documented at length in config.toml.
OPTION_HELP = {
    "cooldown_seconds": "Seconds a key first rests after a 429 without Retry-After or x-ratelimit-reset-*.",
    "max_cooldown_seconds": "Longest backoff a key can get, in seconds.",
    "failure_threshold": "5xx answers, timeouts or connection errors in a row that cool a key.",
    "failure_cooldown_seconds": "Seconds a key first rests when the failure threshold trips.",
    "pool_429_window_seconds": "429s on every usable key within this window cool the pool, not each key (0: off).",
    "max_attempts": "Attempts per request, each with another key, before the client sees an error.",
    "wait_max_seconds": "How long a request may wait for a key to come back before a 503.",
    "attempt_timeout_seconds": "A retry or probe with no answer for this long is a timeout.",
    "revalidate_seconds": "How often invalid and exhausted keys are probed with GET /v1/models (0: never).",
}
POSITIVE = (
    "cooldown_seconds",
    "max_cooldown_seconds",
    "failure_threshold",
    "failure_cooldown_seconds",
    "max_attempts",
    "attempt_timeout_seconds",
)


def is_client_side(error_message: str) -> bool:
    # mitmproxy words the client's hang-ups "Client disconnected." / "client closed …".
    return "client" in error_message.lower()


def as_response(error: OpenAIError) -> http.Response:
    return http.Response.make(error.status, error.body(), error.all_headers())


def response_of(answer: upstream.Answer) -> http.Response:
    return http.Response(
        b"HTTP/1.1",
        answer.status,
        answer.reason,
        http.Headers(answer.header_fields()),
        answer.content,
        None,
        answer.first_byte_at,
        answer.ended_at,
    )


class KeyPool:
    def __init__(self, defaults=None, sender=None) -> None:
        self._defaults = defaults
        self.rotation = Rotation()
        self.db_path: Path | None = None
        self._revision = 0
        self._tasks: list[asyncio.Task] = []
        self._revisions: db.RevisionReader | None = None
        self._writer: writer.Writer | None = None
        self._client: httpx.AsyncClient | None = None
        self.sender = sender  # addons/credential_sender.py's, handed over by the -s entry
        self._late_send = False

    @property
    def pool(self):
        return self.rotation.pool

    @property
    def keys(self) -> list[PoolKey]:
        return self.rotation.pool.keys

    def load(self, loader) -> None:
        loader.add_option(
            "keypool_strategy",
            str,
            default_of(self._defaults, "keypool.strategy"),
            f"How the next upstream key is chosen: {', '.join(STRATEGIES)}.",
        )
        for name, help_text in OPTION_HELP.items():
            loader.add_option(f"keypool_{name}", int, default_of(self._defaults, f"keypool.{name}"), help_text)

    def configure(self, updated: set[str]) -> None:
        options = ctx.options
        if "keypool_strategy" in updated and options.keypool_strategy not in STRATEGIES:
            raise exceptions.OptionsError(
                f"keypool_strategy must be one of {', '.join(STRATEGIES)}, not {options.keypool_strategy!r}."
            )
        for name in OPTION_HELP:
            value = getattr(options, f"keypool_{name}")
            if f"keypool_{name}" in updated and (value < 0 or (value == 0 and name in POSITIVE)):
                raise exceptions.OptionsError(
                    f"keypool_{name} must be {'above zero' if name in POSITIVE else 'zero or more'}, not {value}."
                )
        self.rotation.configure(
            RotationSettings(
                strategy=options.keypool_strategy,
                max_attempts=options.keypool_max_attempts,
                wait_max_seconds=options.keypool_wait_max_seconds,
                policy=Policy(
                    cooldown_seconds=options.keypool_cooldown_seconds,
                    max_cooldown_seconds=options.keypool_max_cooldown_seconds,
                    failure_threshold=options.keypool_failure_threshold,
                    failure_cooldown_seconds=options.keypool_failure_cooldown_seconds,
                    pool_429_window_seconds=options.keypool_pool_429_window_seconds,
                ),
            )
        )
        if "keyrotor_storage" in updated:
            self.db_path = Path(ctx.options.keyrotor_storage)
            self.pool.replace_keys(self._read_keys())

    def running(self) -> None:
        # The key goes on only as the request's bytes leave, and its echo comes out as the answer
        # arrives (addons/credential_sender.py): no hook, view, flow file or record holds it.
        # (The sender is loaded beside this addon by addons/keyrotor.py; without it, the key goes on here.)
        self._late_send = getattr(self.sender, "installed", False)
        self._writer = writer.acquire(self.db_path)
        self.rotation.states = self._writer
        self._client = upstream.new_client(ctx.options.keypool_attempt_timeout_seconds)
        self._revisions = db.RevisionReader(self.db_path)
        self._tasks = [
            asyncio.create_task(
                watch_revision(self._revisions, "keys", self._read_keys, self._revision, self.pool.replace_keys)
            ),
            asyncio.create_task(self._revalidate_periodically()),
        ]

    def done(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._revisions:
            self._revisions.close()
        self._client = None  # its pooled connections close with the process
        self.rotation.states = None
        if self._writer:
            writer.release(self._writer)
            self._writer = None

    def _read_keys(self) -> list[PoolKey]:
        cipher = secrets.key_cipher(self.db_path)
        conn = db.connect(self.db_path)
        try:
            self._revision = db.read_revision(conn, "keys")
            keys = load_pool(conn, cipher)
        finally:
            conn.close()
        log.info("upstream keys loaded: %d, %d active", len(keys), sum(k.state == "active" for k in keys))
        return keys

    # ------------------------------------------------------------------ hooks

    # The hooks are plain functions that return a coroutine only when they must wait (for a
    # key, or for a retry): mitmproxy awaits what a hook returns, and the common case then
    # costs no coroutine at all.

    def request(self, flow: http.HTTPFlow) -> Coroutine | None:
        if flow.response:
            return None
        key = self.rotation.pick_now()
        if key is None:
            return self._request_after_waiting(flow)
        self._send_with(flow, key)
        return None

    async def _request_after_waiting(self, flow: http.HTTPFlow) -> None:
        key = await self.rotation.acquire(frozenset(), self.rotation.wait_deadline())
        if key is None:
            flow.response = as_response(self.rotation.no_key_error(0))
        else:
            self._send_with(flow, key)

    def _send_with(self, flow: http.HTTPFlow, key: PoolKey) -> None:
        use = flow.metadata[KEYPOOL] = KeyUse()
        self.rotation.begin(use, key)
        headers = flow.request.headers
        if self._late_send:
            headers.fields = with_credential(headers.fields, placeholder(key.id, key.last4))
            self.sender.outgoing[flow.id] = key.value
        else:
            headers.fields = with_credential(headers.fields, key.value)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._hide_credential(flow)

    def response(self, flow: http.HTTPFlow) -> Coroutine | None:
        use = KeyUse.of(flow.metadata)
        if use is None or use.settled:
            return None
        response = flow.response
        status = response.status_code
        outcome = classify_response(
            status, response.headers, response.raw_content if status >= 400 else None, time.time()
        )
        self.rotation.end(use, outcome, status, None)
        if outcome is None or not outcome.is_key_failure or response.stream:
            use.settled = True  # a good answer, the request's own fault, or already on its way
            return None
        return self._retry(flow, use, outcome)

    def error(self, flow: http.HTTPFlow) -> Coroutine | None:
        self._hide_credential(flow)
        use = KeyUse.of(flow.metadata)
        if use is None or use.settled or not flow.error or is_client_side(flow.error.msg):
            return None
        self.rotation.end(use, connection_failure(flow.error.msg), None, flow.error.msg)
        if flow.response is not None and flow.response.stream:
            use.settled = True  # part of the answer reached the client: too late to retry
            return None
        return self._recover(flow, use)

    async def _recover(self, flow: http.HTTPFlow, use: KeyUse) -> None:
        await self._retry(flow, use, None)
        if flow.response is not None:
            flow.error = None  # recovered: addons/recovery.py sends this response instead of a 502

    async def _retry(self, flow: http.HTTPFlow, use: KeyUse, outcome: Outcome | None) -> None:
        request = flow.request
        outgoing = Outgoing(request.method, request.url, request.headers.fields, request.raw_content)
        result = await self.rotation.retry(self._client, use, outgoing, outcome)
        if result.answer is not None:
            flow.response = response_of(result.answer)
        if result.refuse:
            flow.response = as_response(self.rotation.no_key_error(len(use.attempts)))

    def _hide_credential(self, flow: http.HTTPFlow) -> None:
        # The request has left: put the placeholder back so no view of the flow shows the key.
        if self._late_send:
            self.sender.outgoing.pop(flow.id, None)
        use = KeyUse.of(flow.metadata)
        if use is not None and use.key_id is not None:
            headers = flow.request.headers
            headers.fields = with_credential(headers.fields, placeholder(use.key_id, use.key_last4))

    # ------------------------------------------------------------------ re-validation

    async def _revalidate_periodically(self) -> None:
        interval = ctx.options.keypool_revalidate_seconds
        if interval <= 0:
            return
        while True:
            await asyncio.sleep(interval)
            try:
                await self.rotation.revalidate(self._client, upstream_url())
            except Exception:
                log.exception("re-validating keys failed; trying again in %d s", interval)


def upstream_url() -> str:
    """The reverse-proxy target (scheme://host[:port]) mitmproxy forwards to."""
    for mode in ctx.options.mode:
        if mode.startswith("reverse:"):
            return mode.removeprefix("reverse:").rstrip("/")
    raise exceptions.OptionsError("keyrotor runs in reverse mode: --mode reverse:https://api.openai.com")
