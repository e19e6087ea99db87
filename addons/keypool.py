"""Which upstream key: pick one, swap it in, learn from upstream's answer, retry on another key.

The first attempt of every request goes through mitmproxy itself, so a good answer
streams to the client unbuffered. When that attempt fails because of its key (401,
403, 429, 5xx, connection error) and nothing has reached the client yet, the
request is sent again with another key by `resend` and the answer is handed to the
client whole. The client sees an error only when no key could serve it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Coroutine
from pathlib import Path

import httpx
from mitmproxy import ctx, exceptions, http

from addons import recovery, resend
from addons.classify import Outcome, classify_response, connection_failure
from addons.credentials import replace_credential
from addons.errors import error_response
from addons.pool import Policy, Pool, StateChange
from addons.probe import probe
from addons.revisions import watch_revision
from config import STRATEGIES, default_of
from storage import db, secrets, writer
from storage.upstream_keys import PoolKey, load_pool
from storage.writer import KeyStateChange

log = logging.getLogger(__name__)

METADATA = "keyrotor.keypool"
# Outcomes that the client must not see as upstream worded them: they are about our keys.
PROOF_POLL_SECONDS = 0.02
KEY_ONLY_FAILURES = frozenset({"invalid", "exhausted", "rate_limited"})

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
POSITIVE = ("cooldown_seconds", "max_cooldown_seconds", "failure_threshold", "failure_cooldown_seconds",
            "max_attempts", "attempt_timeout_seconds")  # fmt: skip


def placeholder(key_id: int, last4: str) -> str:
    return f"[upstream key #{key_id} ...{last4}]"  # ASCII: it sits in a header


def is_client_side(error_message: str) -> bool:
    # mitmproxy words the client's hang-ups "Client disconnected." / "client closed …".
    return "client" in error_message.lower()


class CredentialSender:
    """The last addon in mitmproxy's chain: puts the real key on the request just before it leaves.

    Until then the request carries a placeholder, so mitmweb's view (which snapshots
    flows in its own request hook, after the scripts') never holds a key value.
    """

    def __init__(self) -> None:
        self.outgoing: dict[str, str] = {}  # flow.id → key value; never in flow.metadata

    def request(self, flow: http.HTTPFlow) -> None:
        value = self.outgoing.pop(flow.id, None)
        if value is not None and flow.response is None:
            replace_credential(flow.request.headers, value)


class KeyPool:
    def __init__(self, defaults=None) -> None:
        self._defaults = defaults
        self.pool = Pool()
        self.db_path: Path | None = None
        self._revision = 0
        self._tasks: list[asyncio.Task] = []
        self._writer: writer.Writer | None = None
        self._client: httpx.AsyncClient | None = None
        self.sender = CredentialSender()
        self._late_send = False

    @property
    def keys(self) -> list[PoolKey]:
        return self.pool.keys

    def load(self, loader) -> None:
        recovery.install()
        loader.add_option(
            "keypool_strategy", str, default_of(self._defaults, "keypool.strategy"),
            f"How the next upstream key is chosen: {', '.join(STRATEGIES)}.",
        )  # fmt: skip
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
        self.pool.policy = Policy(
            cooldown_seconds=options.keypool_cooldown_seconds,
            max_cooldown_seconds=options.keypool_max_cooldown_seconds,
            failure_threshold=options.keypool_failure_threshold,
            failure_cooldown_seconds=options.keypool_failure_cooldown_seconds,
            pool_429_window_seconds=options.keypool_pool_429_window_seconds,
        )
        if "keyrotor_storage" in updated:
            self.db_path = Path(ctx.options.keyrotor_storage)
            self.pool.replace_keys(self._read_keys())

    def running(self) -> None:
        # Only mitmweb and the mitmproxy console show flows while their request hooks run
        # (their view, intercepts): there the key goes on last. mitmdump skips the detour.
        self._late_send = ctx.master.addons.get("view") is not None
        if self._late_send:
            ctx.master.addons.add(self.sender)  # appended: runs after every other request hook
        self._writer = writer.acquire(self.db_path)
        self._client = resend.new_client(ctx.options.keypool_attempt_timeout_seconds)
        self._tasks = [
            asyncio.create_task(
                watch_revision(self.db_path, "keys", self._read_keys, self._revision, self.pool.replace_keys)
            ),
            asyncio.create_task(self._revalidate_periodically()),
        ]

    def done(self) -> None:
        if self._late_send:
            ctx.master.addons.remove(self.sender)
        for task in self._tasks:
            task.cancel()
        self._client = None  # its pooled connections close with the process
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
        key = self.pool.pick(ctx.options.keypool_strategy, time.time())
        if key is None:
            return self._request_after_waiting(flow)
        self._send_with(flow, key)
        return None

    async def _request_after_waiting(self, flow: http.HTTPFlow) -> None:
        key = await self._acquire(frozenset(), time.time() + ctx.options.keypool_wait_max_seconds)
        if key is None:
            flow.response = self._no_key_response(0)
        else:
            self._send_with(flow, key)

    def _send_with(self, flow: http.HTTPFlow, key: PoolKey) -> None:
        meta = flow.metadata[METADATA] = {"attempts": []}
        self._begin_attempt(meta, key)
        if self._late_send:
            replace_credential(flow.request.headers, placeholder(key.id, key.last4))
            self.sender.outgoing[flow.id] = key.value
        else:
            replace_credential(flow.request.headers, key.value)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._hide_credential(flow)

    def response(self, flow: http.HTTPFlow) -> Coroutine | None:
        meta = flow.metadata.get(METADATA)
        if not meta or meta.get("settled"):
            return None
        response = flow.response
        outcome = classify_response(
            response.status_code, response.headers, response.raw_content if response.status_code >= 400 else None,
            time.time(),
        )  # fmt: skip
        self._end_attempt(meta, outcome, response.status_code, None)
        if outcome is None or not outcome.is_key_failure or response.stream:
            meta["settled"] = True  # a good answer, the request's own fault, or already on its way
            return None
        return self._retry(flow, meta, outcome)

    def error(self, flow: http.HTTPFlow) -> Coroutine | None:
        self._hide_credential(flow)
        meta = flow.metadata.get(METADATA)
        if not meta or meta.get("settled") or not flow.error or is_client_side(flow.error.msg):
            return None
        self._end_attempt(meta, connection_failure(flow.error.msg), None, flow.error.msg)
        if flow.response is not None and flow.response.stream:
            meta["settled"] = True  # part of the answer reached the client: too late to retry
            return None
        return self._recover(flow, meta)

    async def _recover(self, flow: http.HTTPFlow, meta: dict) -> None:
        await self._retry(flow, meta, None)
        if flow.response is not None:
            flow.error = None  # recovered: addons.recovery sends this response instead of a 502

    # ------------------------------------------------------------------ attempts

    async def _acquire(self, exclude: frozenset[int], deadline: float) -> PoolKey | None:
        """A usable key, waiting until `deadline` for a cooling one to come back."""
        strategy = ctx.options.keypool_strategy
        while True:
            now = time.time()
            key = self.pool.pick(strategy, now, exclude)
            if key is not None:
                return key
            if self.pool.awaiting_proof():
                if now + PROOF_POLL_SECONDS > deadline:
                    # No time to wait for a new key's first answer: share it rather than fail.
                    return self.pool.pick(strategy, now, exclude, busy_ok=True)
                await asyncio.sleep(PROOF_POLL_SECONDS)
                continue
            wait = self.pool.soonest_return(now)
            if wait is None or now + wait > deadline:
                return None
            await asyncio.sleep(max(wait, PROOF_POLL_SECONDS))  # a probe in flight ends the wait early or late

    def _begin_attempt(self, meta: dict, key: PoolKey) -> None:
        now = time.time()
        probe = self.pool.started(key, now)
        meta.update(key_id=key.id, key_last4=key.last4, probe=probe)
        meta["attempts"].append(
            {"attempt": len(meta["attempts"]) + 1, "key_id": key.id, "started_at": now, "status": None, "error": None}
        )

    def _end_attempt(self, meta: dict, outcome: Outcome | None, status: int | None, error: str | None) -> None:
        now = time.time()
        attempt = meta["attempts"][-1]
        attempt.update(status=status, error=error, duration_ms=round((now - attempt["started_at"]) * 1000, 3))
        meta["outcome"] = outcome.kind if outcome else None
        key = self.pool.by_id.get(meta["key_id"])
        if key is None:
            return  # deleted by an admin while the request ran
        self.pool.finished(key)
        self._persist(self.pool.learn(key, outcome, now, meta.get("probe", False)), now)

    async def _retry(self, flow: http.HTTPFlow, meta: dict, outcome: Outcome | None) -> None:
        """Send the request again with other keys until one answers well or attempts run out.

        `outcome` is what the answer now in flow.response said (None: no answer yet).
        """
        answered = outcome
        deadline = time.time() + ctx.options.keypool_wait_max_seconds
        while len(meta["attempts"]) < ctx.options.keypool_max_attempts:
            key = await self._acquire(frozenset(a["key_id"] for a in meta["attempts"]), deadline)
            if key is None:
                break
            self._begin_attempt(meta, key)
            headers = flow.request.headers.copy()
            replace_credential(headers, key.value)
            try:
                answer = await resend.send(
                    self._client, flow.request.method, flow.request.url, list(headers.fields), flow.request.raw_content
                )
            except httpx.HTTPError as e:
                message = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                self._end_attempt(meta, connection_failure(message), None, message)
                continue
            answered = classify_response(
                answer.status, answer.headers, answer.content if answer.status >= 400 else None, time.time()
            )
            self._end_attempt(meta, answered, answer.status, None)
            flow.response = self._response_of(answer)
            if answered is None or not answered.is_key_failure:
                break
        meta["settled"] = True
        if answered is not None and answered.kind in KEY_ONLY_FAILURES:
            # Upstream's words are about our key (its 401 even shows part of it): say it our way.
            flow.response = self._no_key_response(len(meta["attempts"]))

    @staticmethod
    def _response_of(answer: resend.Answer) -> http.Response:
        return http.Response(
            b"HTTP/1.1", answer.status, answer.reason, http.Headers(answer.header_fields()), answer.content,
            None, answer.first_byte_at, answer.ended_at,
        )  # fmt: skip

    def _no_key_response(self, attempts: int) -> http.Response:
        wait = self.pool.soonest_return(time.time())
        retry_after = math.ceil(wait) if wait is not None else ctx.options.keypool_cooldown_seconds
        tried = f" after {attempts} attempt{'s' if attempts != 1 else ''} with different keys" if attempts else ""
        return error_response(
            503,
            f"No upstream API key is available right now{tried}: every key in the pool is cooling down,"
            " exhausted, invalid or disabled. Retry after the Retry-After seconds.",
            "server_error",
            "no_upstream_key_available",
            {"retry-after": str(max(1, retry_after))},
        )

    # ------------------------------------------------------------------ state

    def _persist(self, changes: list[StateChange], now: float) -> None:
        for change in changes:
            key = change.key
            log.info("upstream key #%d …%s is now %s (%s)", key.id, key.last4, change.state, change.reason or "ok")
            if self._writer:
                self._writer.put(KeyStateChange(key.id, change.state, change.reason, change.cooldown_until, now))

    def _hide_credential(self, flow: http.HTTPFlow) -> None:
        # The request has left: put the placeholder back so no view of the flow shows the key.
        if self._late_send:
            self.sender.outgoing.pop(flow.id, None)
        meta = flow.metadata.get(METADATA)
        if meta and "key_id" in meta:
            replace_credential(flow.request.headers, placeholder(meta["key_id"], meta["key_last4"]))

    # ------------------------------------------------------------------ re-validation

    async def _revalidate_periodically(self) -> None:
        interval = ctx.options.keypool_revalidate_seconds
        if interval <= 0:
            return
        while True:
            await asyncio.sleep(interval)
            try:
                await self.revalidate([k for k in self.pool.keys if k.state in ("invalid", "exhausted")])
            except Exception:
                log.exception("re-validating keys failed; trying again in %d s", interval)

    async def revalidate(self, keys: list[PoolKey]) -> None:
        """Probe each key with GET /v1/models (no tokens spent); a pass makes it active again."""
        for key in keys:
            outcome = await probe(self._client, upstream_url(), key.value)
            now = time.time()
            if outcome.kind == "ok":
                self._persist(self.pool.learn(key, outcome, now, probe=True), now)


def upstream_url() -> str:
    """The reverse-proxy target (scheme://host[:port]) mitmproxy forwards to."""
    for mode in ctx.options.mode:
        if mode.startswith("reverse:"):
            return mode.removeprefix("reverse:").rstrip("/")
    raise exceptions.OptionsError("keyrotor runs in reverse mode: --mode reverse:https://api.openai.com")
