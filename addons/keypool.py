"""Which upstream key: pick one from the pool, swap it in, learn from upstream's answer."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path

from mitmproxy import ctx, exceptions, http

from addons.credentials import replace_credential
from addons.errors import error_response
from addons.revisions import watch_revision
from config import STRATEGIES, default_of
from storage import db, secrets, writer
from storage.upstream_keys import PoolKey, load_pool
from storage.writer import KeyStateChange

log = logging.getLogger(__name__)

METADATA = "keyrotor.keypool"

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


@dataclass(frozen=True)
class Verdict:
    """What an upstream answer says about the key that was used."""

    state: str  # active, cooling, exhausted, invalid
    reason: str | None = None
    cooldown_until: float | None = None


def retry_after_seconds(headers: http.Headers, now: float) -> float | None:
    """Retry-After as seconds from now: either delta-seconds or an HTTP date."""
    value = headers.get("retry-after", "").strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - now)
    except (TypeError, ValueError):
        return None


def error_code(content: bytes | None) -> str | None:
    """`error.code` (or `error.type`) of an OpenAI-shaped error body, if it is one."""
    try:
        error = json.loads(content or b"")["error"]
        return error.get("code") or error.get("type")
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def classify_response(
    status: int, headers: http.Headers, content: bytes | None, now: float, default_cooldown: float
) -> Verdict | None:
    """The key's new state after this answer, or None when the answer says nothing about the key."""
    if 200 <= status < 300:
        return Verdict("active")
    if status in (401, 403):
        return Verdict("invalid", f"{status} {error_code(content) or 'unauthorized'}")
    if status == 429:
        code = error_code(content)
        if code == "insufficient_quota" or b"exceeded your current quota" in (content or b""):
            return Verdict("exhausted", "429 insufficient_quota")
        wait = retry_after_seconds(headers, now)
        return Verdict("cooling", f"429 {code or 'rate limited'}", now + (default_cooldown if wait is None else wait))
    return None


def is_usable(key: PoolKey, now: float) -> bool:
    # A cooling key whose time is up is usable again: its next request is the probe.
    return key.state == "active" or (key.state == "cooling" and (key.cooldown_until or 0) <= now)


def soonest_return(keys: list[PoolKey], now: float) -> float | None:
    """Seconds until the first cooling key may be tried again, if any is cooling."""
    ends = [k.cooldown_until for k in keys if k.state == "cooling" and k.cooldown_until]
    return max(0.0, min(ends) - now) if ends else None


def placeholder(key_id: int, last4: str) -> str:
    return f"[upstream key #{key_id} ...{last4}]"  # ASCII: it sits in a header


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
        self.keys: list[PoolKey] = []
        self._by_id: dict[int, PoolKey] = {}
        self.db_path: Path | None = None
        self._cursor = 0
        self._revision = 0
        self._watcher: asyncio.Task | None = None
        self._writer: writer.Writer | None = None
        self.sender = CredentialSender()
        self._late_send = False

    def load(self, loader) -> None:
        loader.add_option(
            "keypool_strategy", str, default_of(self._defaults, "keypool.strategy"),
            f"How the next upstream key is chosen: {', '.join(STRATEGIES)}.",
        )  # fmt: skip
        for name, help_text in OPTION_HELP.items():
            loader.add_option(f"keypool_{name}", int, default_of(self._defaults, f"keypool.{name}"), help_text)

    def configure(self, updated: set[str]) -> None:
        if "keypool_strategy" in updated and ctx.options.keypool_strategy not in STRATEGIES:
            raise exceptions.OptionsError(
                f"keypool_strategy must be one of {', '.join(STRATEGIES)}, not {ctx.options.keypool_strategy!r}."
            )
        if "keypool_cooldown_seconds" in updated and ctx.options.keypool_cooldown_seconds <= 0:
            raise exceptions.OptionsError("keypool_cooldown_seconds must be above zero.")
        if "keyrotor_storage" in updated:
            self.db_path = Path(ctx.options.keyrotor_storage)
            self._reload()

    def running(self) -> None:
        # Only mitmweb and the mitmproxy console show flows while their request hooks run
        # (their view, intercepts): there the key goes on last. mitmdump skips the detour.
        self._late_send = ctx.master.addons.get("view") is not None
        if self._late_send:
            ctx.master.addons.add(self.sender)  # appended: runs after every other request hook
        self._writer = writer.acquire(self.db_path)
        self._watcher = asyncio.create_task(watch_revision(self.db_path, "keys", self._reload, self._revision))

    def done(self) -> None:
        if self._late_send:
            ctx.master.addons.remove(self.sender)
        if self._watcher:
            self._watcher.cancel()
        if self._writer:
            writer.release(self._writer)
            self._writer = None

    def _reload(self) -> None:
        cipher = secrets.key_cipher(self.db_path)
        conn = db.connect(self.db_path)
        try:
            self._revision = db.read_revision(conn, "keys")
            keys = load_pool(conn, cipher)
        finally:
            conn.close()
        self._by_id = {k.id: k for k in keys}
        self.keys = keys
        log.info("upstream keys loaded: %d, %d active", len(keys), sum(k.state == "active" for k in keys))

    def pick(self, now: float) -> PoolKey | None:
        keys = self.keys
        if ctx.options.keypool_strategy == "random":
            usable = [k for k in keys if is_usable(k, now)]
            return random.choice(usable) if usable else None
        for step in range(len(keys)):
            key = keys[(self._cursor + step) % len(keys)]
            if is_usable(key, now):
                self._cursor = (self._cursor + step + 1) % len(keys)
                return key
        return None

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response:
            return
        now = time.time()
        key = self.pick(now)
        if key is None:
            wait = soonest_return(self.keys, now)
            retry_after = math.ceil(wait) if wait is not None else ctx.options.keypool_cooldown_seconds
            flow.response = error_response(
                503,
                "No upstream API key is available right now: every key in the pool is cooling down,"
                " exhausted, invalid or disabled. Retry after the Retry-After seconds.",
                "server_error",
                "no_upstream_key_available",
                {"retry-after": str(max(1, retry_after))},
            )
            return
        key.requests += 1
        # A cooling key picked now is a probe: only its answer may bring the key back.
        flow.metadata[METADATA] = {"key_id": key.id, "key_last4": key.last4, "probe": key.state != "active"}
        if self._late_send:
            replace_credential(flow.request.headers, placeholder(key.id, key.last4))
            self.sender.outgoing[flow.id] = key.value
        else:
            replace_credential(flow.request.headers, key.value)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._hide_credential(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        key = self._key_of(flow)
        if key is None:
            return
        now = time.time()
        verdict = classify_response(
            flow.response.status_code, flow.response.headers, flow.response.raw_content
            if flow.response.status_code >= 400 else None, now, ctx.options.keypool_cooldown_seconds,
        )  # fmt: skip
        if verdict is None or verdict.state == key.state == "active":
            return
        if verdict.state == "active" and not flow.metadata[METADATA]["probe"]:
            return  # sent before another request cooled or invalidated the key: it proves nothing now
        self._set_state(key, verdict, now)

    def error(self, flow: http.HTTPFlow) -> None:
        self._hide_credential(flow)

    def _key_of(self, flow: http.HTTPFlow) -> PoolKey | None:
        meta = flow.metadata.get(METADATA)
        if not meta:
            return None
        return self._by_id.get(meta["key_id"])

    def _set_state(self, key: PoolKey, verdict: Verdict, now: float) -> None:
        if key.state == "disabled":
            return  # an admin's decision outranks what upstream says
        key.state, key.state_reason, key.cooldown_until = verdict.state, verdict.reason, verdict.cooldown_until
        log.info("upstream key #%d …%s is now %s (%s)", key.id, key.last4, verdict.state, verdict.reason or "ok")
        self._writer.put(KeyStateChange(key.id, verdict.state, verdict.reason, verdict.cooldown_until, now))

    def _hide_credential(self, flow: http.HTTPFlow) -> None:
        # The request has left: put the placeholder back so no view of the flow shows the key.
        if self._late_send:
            self.sender.outgoing.pop(flow.id, None)
        meta = flow.metadata.get(METADATA)
        if meta:
            replace_credential(flow.request.headers, placeholder(meta["key_id"], meta["key_last4"]))
