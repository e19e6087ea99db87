"""Bodies as they travelled (content-encoded) made readable, and what a row keeps of them."""

from __future__ import annotations

import gzip
import json
import zlib
from typing import Any

import brotli

try:
    from compression import zstd  # Python 3.14+
except ImportError:  # pragma: no cover - depends on the interpreter
    from backports import zstd  # installed with mitmproxy


def _deflate(data: bytes) -> bytes:
    try:
        return zlib.decompress(data)
    except zlib.error:
        return zlib.decompress(data, -zlib.MAX_WBITS)  # raw deflate, as some servers send it


DECODERS = {
    "gzip": gzip.decompress,
    "x-gzip": gzip.decompress,
    "deflate": _deflate,
    "br": brotli.decompress,
    "zstd": zstd.decompress,
    "identity": lambda data: data,
}


def decoded(raw: bytes | None, content_encoding: str | None) -> bytes:
    """The body with its content-encoding undone; what travelled when that is unknown or corrupt."""
    if not raw:
        return b""
    if not content_encoding:
        return raw
    decode = DECODERS.get(content_encoding.strip().lower())
    if decode is None:
        return raw
    try:
        return decode(raw)
    except Exception:  # every codec has its own error type; a broken body is kept as it came
        return raw


def json_object(body: bytes) -> dict[str, Any] | None:
    if not body or body[:1] not in (b"{", b" ", b"\n"):
        return None
    try:
        value = json.loads(body)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def sse_usage(body: bytes) -> dict[str, Any] | None:
    """The usage object of a streamed completion: in the last data event that carries one."""
    for line in reversed(body.split(b"\n")):
        if line.startswith(b"data:") and b'"usage"' in line:
            event = json_object(line[5:].strip())
            if event and isinstance(event.get("usage"), dict):
                return event["usage"]
    return None


def stored_body(body: bytes, mode: str, limit: int) -> tuple[str | None, bool]:
    """What a row keeps of a body under capture's body mode: (text or None, truncated)."""
    if mode == "none":
        return None, False
    truncated = mode == "truncated" and len(body) > limit
    kept = body[:limit] if truncated else body
    return kept.decode("utf-8", errors="replace"), truncated
