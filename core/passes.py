"""A pass: how the UI sends a request through the proxy under a client whose key it cannot know.

Client keys are kept only as their sha256, so the UI (the playground, replays, traces)
cannot present one. Instead it mints a short-lived pass naming the client and, when the
admin asked, where the request is pinned (a group, an upstream key) and which flow it
replays; the pass is HMAC-signed with a key derived from the installation's secret, which
the proxy and the UI both read beside the database (storage/secrets.py pass_key). The
request carries it in `x-keyrotor-pass` instead of a client key; the proxy's Access addon
verifies it and then treats the request as that client's, limits and all.

A pass is `krp1.<payload>.<mac>`, both base64url: the payload is compact JSON. Each pass is
good for one request (its nonce is remembered until it expires) and for PASS_SECONDS.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

PASS_HEADER = "x-keyrotor-pass"
PASS_HEADER_BYTES = PASS_HEADER.encode()
PASS_SECONDS = 120.0
FLOW_HEADER = "x-keyrotor-flow"  # on the proxy's answer to a pass: the flow's id (mitmproxy's), to find its record
PREFIX = "krp1"
MAX_PASS_LENGTH = 1024  # a pass is ~200 characters: anything far longer is not one


def derive_key(secret: bytes) -> bytes:
    """The pass-signing key, derived from the installation's secret (one secret never serves two primitives)."""
    return hashlib.sha256(b"keyrotor-pass\0" + secret).digest()


@dataclass(frozen=True)
class Pass:
    """Who a request runs as, and where the admin pinned it."""

    client_id: int
    group_id: int | None = None
    key_id: int | None = None
    replay_of: int | None = None  # the flow (row id) this request sends again
    nonce: str = field(default_factory=lambda: secrets.token_urlsafe(12))
    expires_at: float = 0.0

    @property
    def pinned(self) -> bool:
        return self.group_id is not None or self.key_id is not None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(key: bytes, payload: str) -> str:
    return _b64(hmac.new(key, f"{PREFIX}.{payload}".encode(), hashlib.sha256).digest())


def mint(
    key: bytes,
    client_id: int,
    *,
    group_id: int | None = None,
    key_id: int | None = None,
    replay_of: int | None = None,
    now: float | None = None,
    seconds: float = PASS_SECONDS,
) -> str:
    """A signed pass for one request as client `client_id`, good for `seconds`."""
    expires = (time.time() if now is None else now) + seconds
    values = {"c": client_id, "g": group_id, "k": key_id, "r": replay_of, "n": secrets.token_urlsafe(12), "e": expires}
    payload = _b64(json.dumps({k: v for k, v in values.items() if v is not None}, separators=(",", ":")).encode())
    return f"{PREFIX}.{payload}.{_mac(key, payload)}"


def _optional_id(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("not an id")
    return value


def verify(key: bytes, token: str, now: float | None = None) -> Pass | None:
    """The pass `token` stands for, or None: malformed, signed with another key, or expired.

    The signature is compared in constant time before anything in the payload is read."""
    if not key or len(token) > MAX_PASS_LENGTH:
        return None
    prefix, _, rest = token.strip().partition(".")
    payload, _, mac = rest.partition(".")
    if prefix != PREFIX or not payload or not mac:
        return None
    if not hmac.compare_digest(_mac(key, payload).encode(), mac.encode()):
        return None
    try:
        values = json.loads(_unb64(payload))
        client_id = _optional_id(values["c"])
        expires = values["e"]
        if client_id is None or not isinstance(expires, int | float) or isinstance(expires, bool):
            return None
        found = Pass(
            client_id,
            _optional_id(values.get("g")),
            _optional_id(values.get("k")),
            _optional_id(values.get("r")),
            str(values["n"]),
            float(expires),
        )
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError):
        return None
    now = time.time() if now is None else now
    if not now < found.expires_at <= now + PASS_SECONDS + 5:
        return None  # expired, or made to last longer than any pass the UI mints
    return found


def pass_from(fields: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The pass a request carries in `x-keyrotor-pass`, if any (an empty header counts as one)."""
    for name, value in fields:
        if name.lower() == PASS_HEADER_BYTES:
            return value.decode("latin-1")
    return None


class SpentPasses:
    """The nonces of passes already used, until they expire: a pass serves one request."""

    def __init__(self) -> None:
        self._spent: dict[str, float] = {}

    def spend(self, found: Pass, now: float) -> bool:
        """True the first time `found` is used; False when it was used before."""
        if len(self._spent) > 1024:
            self._spent = {n: e for n, e in self._spent.items() if e > now}
        if found.nonce in self._spent:
            return False
        self._spent[found.nonce] = found.expires_at
        return True
