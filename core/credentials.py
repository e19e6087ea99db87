"""Reading and replacing the credential a client sent, in either of the forms OpenAI SDKs use.

Works on raw header fields (name, value) so it serves mitmproxy's and httpx's headers
alike, in one pass: mitmproxy's Headers lower-cases every name on every lookup.
"""

from __future__ import annotations

import hashlib
from typing import Protocol
from urllib.parse import unquote_plus

from core.bodies import STREAM_ENCODINGS, StreamDecoder, decoded

AUTHORIZATION = b"authorization"
API_KEY = b"api-key"  # Azure OpenAI's form
# Browsers cannot set headers on a WebSocket: OpenAI's Realtime API takes the key as a subprotocol.
SUBPROTOCOL = b"sec-websocket-protocol"
INSECURE_KEY_PROTOCOL = b"openai-insecure-api-key."

Fields = tuple[tuple[bytes, bytes], ...]


def credential_from(fields: Fields) -> str | None:
    """`Authorization: Bearer <key>`, else `api-key: <key>`, else the `openai-insecure-api-key.<key>`
    WebSocket subprotocol; None when none carries one."""
    api_key = None
    protocol_key = None
    for name, value in fields:
        lowered = name.lower()
        if lowered == AUTHORIZATION:
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip().decode("latin-1")
        elif lowered == API_KEY and value.strip():
            api_key = value.strip().decode("latin-1")
        elif lowered == SUBPROTOCOL and protocol_key is None:
            protocol_key = subprotocol_credential(value)
    return api_key or protocol_key


def subprotocol_credential(value: bytes) -> str | None:
    """The key in a `Sec-WebSocket-Protocol` list, as `openai-insecure-api-key.<key>`."""
    for item in value.split(b","):
        item = item.strip()
        if item[: len(INSECURE_KEY_PROTOCOL)].lower() == INSECURE_KEY_PROTOCOL and len(item) > len(
            INSECURE_KEY_PROTOCOL
        ):
            return item[len(INSECURE_KEY_PROTOCOL) :].decode("latin-1")
    return None


def _with_subprotocol_key(value: bytes, key: bytes) -> bytes:
    """A `Sec-WebSocket-Protocol` list whose key protocol carries `key` instead (the others as they were)."""
    items = [item.strip() for item in value.split(b",")]
    return b", ".join(
        INSECURE_KEY_PROTOCOL + key if item[: len(INSECURE_KEY_PROTOCOL)].lower() == INSECURE_KEY_PROTOCOL else item
        for item in items
    )


def with_credential(fields: Fields, value: str) -> Fields:
    """`value` wherever the client put its credential (Bearer and/or api-key); Bearer if nowhere."""
    return _with_value(fields, value, frozenset(), True)


def _with_value(fields: Fields, value: str, dropped: frozenset[bytes], bearer_if_none: bool) -> Fields:
    """`value` in every Bearer and api-key header and key subprotocol, the `dropped` headers left out.

    A key subprotocol alone does not count as the credential's place: a Bearer header is added
    beside it, so an upstream that reads either finds the key."""
    encoded = value.encode()
    replaced = False
    result = []
    for name, old in fields:
        lowered = name.lower()
        if lowered == AUTHORIZATION:
            result.append((name, b"Bearer " + encoded))
            replaced = True
        elif lowered == API_KEY:
            result.append((name, encoded))
            replaced = True
        elif lowered == SUBPROTOCOL and INSECURE_KEY_PROTOCOL in old.lower():
            result.append((name, _with_subprotocol_key(old, encoded)))
        elif lowered not in dropped:
            result.append((name, old))
    if bearer_if_none and not replaced:
        result.append((AUTHORIZATION, b"Bearer " + encoded))
    return tuple(result)


def masked(key: str) -> str:
    """A refused credential shortened beyond use, for the error message that names it: its last four."""
    return f"…{key[-4:]}" if len(key) > 10 else "…"


def placeholder(key_id: int, last4: str) -> str:
    """What stands in a request's headers instead of an upstream key, wherever it can be seen."""
    return f"[upstream key #{key_id} ...{last4}]"  # ASCII: it sits in a header


class KeyHandoff(Protocol):
    """Where the key pool leaves a flow's key to be put on only as the request's bytes leave
    (addons/credential_sender.py): `outgoing` maps flow id → key, `installed` says the patch is in;
    `answering` maps flow id → (key, placeholder) for a retried stream fed through mitmproxy's stream."""

    outgoing: dict[str, str]
    answering: dict[str, tuple[str, str]]
    installed: bool


# ---------------------------------------------------------------- what a flow may show

# Query parameters some clients put a key in (Azure's and Google's SDKs, hand-made URLs).
QUERY_CREDENTIALS = frozenset({"api-key", "api_key", "key"})
# Headers that can carry a credential keyrotor does not read: never shown, never forwarded.
DROPPED_HEADERS = frozenset({b"x-api-key", b"proxy-authorization", b"cookie"})


def query_credential(path: str) -> tuple[str | None, str]:
    """A key sent as `?api-key=` or `?key=`, and the path without any such parameter.

    The other parameters keep their order and spelling; the first non-empty key wins.
    """
    target, sep, query = path.partition("?")
    if not sep:
        return None, path
    found = None
    kept = []
    for item in query.split("&"):
        name, _, value = item.partition("=")
        if unquote_plus(name).strip().lower() in QUERY_CREDENTIALS:
            found = found or unquote_plus(value).strip() or None
        else:
            kept.append(item)
    if len(kept) == query.count("&") + 1:
        return None, path
    return found, target + ("?" + "&".join(kept) if kept else "")


def scrubbed(fields: Fields, placeholder_text: str, ensure: bool = False) -> Fields:
    """The headers with every credential replaced (Bearer and api-key) or dropped (the others).

    With `ensure`, a request that carried its key elsewhere (the query string) gets a Bearer one.
    """
    return _with_value(fields, placeholder_text, DROPPED_HEADERS, ensure)


def refused_placeholder(key: str | None) -> str:
    """What stands in a refused request's headers instead of the credential it carried."""
    return f"[refused key ...{key[-4:]}]" if key and len(key) > 10 else "[refused key]"


class EchoFilter:
    """Replaces a secret in data that arrives in pieces, the secret perhaps split between two.

    The tail of a piece that could be the start of the secret is held back until the next
    piece (or `flush`) shows whether it is; everything else passes on at once.
    """

    def __init__(self, secret: bytes, replacement: bytes) -> None:
        self.secret = secret
        self.replacement = replacement
        self.replaced = False
        self._carry = b""
        self._prefixes: list[bytes] | None = None  # made when first needed: most answers never need them

    def feed(self, data: bytes) -> bytes:
        data = self._carry + data if self._carry else data
        if self.secret in data:
            data = data.replace(self.secret, self.replacement)
            self.replaced = True
        self._carry = b""
        if data and data[-1:] in self.secret:  # cheap test before the prefix scan
            if self._prefixes is None:
                # Longest first: the longest tail that could still grow into the secret is held back.
                self._prefixes = [self.secret[:n] for n in range(len(self.secret) - 1, 0, -1)]
            for prefix in self._prefixes:
                if data.endswith(prefix):
                    self._carry = prefix
                    return data[: -len(prefix)]
        return data

    def flush(self) -> bytes:
        carry, self._carry = self._carry, b""
        return carry

    def fields(self, fields: Fields) -> Fields:
        """Header fields with the secret replaced in every value."""
        if not any(self.secret in value for _, value in fields):
            return fields
        self.replaced = True
        return tuple((name, value.replace(self.secret, self.replacement)) for name, value in fields)


SCAN_PIECE_BYTES = 65536  # how much of an encoded body is decoded at a time to look for an echo


def encoded_echo(body: bytes, encoding: str, secret: bytes, replacement: bytes) -> bytes | None:
    """A compressed body (gzip, deflate, br, zstd) decoded with `secret` replaced, when it holds the
    secret; None when it does not (or is not compressed), and the body then goes on as it came.

    Looked for piece by piece, so a large body that holds no key is never held decoded whole."""
    encoding = encoding.strip().lower()
    if not body or not secret or encoding not in STREAM_ENCODINGS:
        return None
    decoder = StreamDecoder(encoding)
    overlap = len(secret) - 1
    tail = b""
    found = False
    for start in range(0, len(body), SCAN_PIECE_BYTES):
        piece = tail + decoder.feed(body[start : start + SCAN_PIECE_BYTES])
        if decoder.failed:
            return None
        if secret in piece:
            found = True
            break
        tail = piece[-overlap:] if overlap else b""
    if not found and secret not in tail + decoder.flush():
        return None
    return decoded(body, encoding).replace(secret, replacement)


def hash_client_key(key: str) -> str:
    """How a client key is kept and looked up: its SHA-256, never the key."""
    # Issued keys carry 256 random bits, so a plain digest cannot be brute-forced.
    return hashlib.sha256(key.encode()).hexdigest()
