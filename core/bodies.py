"""Bodies as they travelled (content-encoded) made readable, and what a row keeps of them."""

from __future__ import annotations

import gzip
import json
import re
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import brotli

# A version test rather than try/except ImportError, so that mypy follows the branch it checks.
if sys.version_info >= (3, 14):
    from compression import zstd
else:  # pragma: no cover - depends on the interpreter
    from backports import zstd  # installed with mitmproxy before 3.14


def _deflate(data: bytes) -> bytes:
    try:
        return zlib.decompress(data)
    except zlib.error:
        return zlib.decompress(data, -zlib.MAX_WBITS)  # raw deflate, as some servers send it


DECODERS: dict[str, Callable[[bytes], bytes]] = {
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


def event_usage(event: dict[str, Any]) -> dict[str, Any] | None:
    """The usage an event carries: its own (chat, completions), or its response's (the Responses
    API's `response.completed`, Realtime's `response.done`)."""
    usage = event.get("usage")
    if not isinstance(usage, dict):
        response = event.get("response")
        usage = response.get("usage") if isinstance(response, dict) else None
    return usage if isinstance(usage, dict) else None


def sse_usage(body: bytes) -> dict[str, Any] | None:
    """The usage object of a streamed answer: in the last data event that carries one."""
    for line in reversed(body.split(b"\n")):
        if line.startswith(b"data:") and b'"usage"' in line:
            event = json_object(line[5:].strip())
            usage = event_usage(event) if event else None
            if usage is not None:
                return usage
    return None


# Content types whose bodies are text; anything else (audio, images, octet-stream) is kept as bytes.
TEXT_TYPES = ("text/", "json", "event-stream", "xml", "x-www-form-urlencoded", "javascript")
SNIFFED_BYTES = 8192


def is_text(content_type: str, body: bytes) -> bool:
    """Whether a body is text to store, read and search, or bytes to keep apart (by its type)."""
    if not body:
        return True
    media_type = content_type.partition(";")[0].strip().lower()
    if media_type:
        return any(t in media_type for t in TEXT_TYPES)
    head = body[:SNIFFED_BYTES]  # no type given: text if its start reads as UTF-8
    if b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start > len(head) - 4 and len(body) > len(head)  # a character cut at the sniffed end
    return True


_BOUNDARY = re.compile(rb'boundary="?([^";]+)"?', re.I)
_PARAMETER = re.compile(rb'\b(name|filename)="([^"]*)"', re.I)


@dataclass(frozen=True)
class FormPart:
    name: str
    value: bytes
    filename: str | None = None  # a file part (an upload), else a plain field
    content_type: str | None = None

    @property
    def is_file(self) -> bool:
        """An upload (audio, an image, a JSONL file), kept as bytes; a plain field is text."""
        return self.filename is not None or not is_text(self.content_type or "", self.value)


def form_parts(content_type: str, body: bytes) -> list[FormPart]:
    """The parts of a multipart/form-data body; [] when it is not one."""
    boundary = _BOUNDARY.search(content_type.encode("latin-1", "replace"))
    if boundary is None or "multipart/form-data" not in content_type.lower():
        return []
    parts = []
    for chunk in body.split(b"--" + boundary.group(1))[1:]:
        if chunk.startswith(b"--"):  # the closing delimiter
            break
        head, sep, value = chunk.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        if not sep:
            continue
        params = {k.decode().lower(): v.decode("utf-8", "replace") for k, v in _PARAMETER.findall(head)}
        part_type = None
        for line in head.split(b"\r\n"):
            name, _, header_value = line.partition(b":")
            if name.strip().lower() == b"content-type":
                part_type = header_value.strip().decode("latin-1")
        if "name" in params:
            parts.append(FormPart(params["name"], value.removesuffix(b"\r\n"), params.get("filename"), part_type))
    return parts


def form_summary(parts: list[FormPart]) -> dict[str, Any]:
    """A form as JSON to store and show: its fields' values, its files by name, type and size only."""
    summary: dict[str, Any] = {}
    for part in parts:
        if part.is_file:
            value: Any = {"filename": part.filename, "content_type": part.content_type, "size": len(part.value)}
        else:
            value = part.value.decode("utf-8", "replace")
        if part.name in summary:  # repeated fields (image[] in edits): a list
            previous = summary[part.name]
            summary[part.name] = [*previous, value] if isinstance(previous, list) else [previous, value]
        else:
            summary[part.name] = value
    return summary


def kept_bytes(body: bytes, mode: str, limit: int) -> tuple[bytes | None, bool]:
    """What a row keeps of a binary body under capture's body mode: (bytes or None, truncated)."""
    if mode == "none" or not body:
        return None, False
    truncated = mode == "truncated" and len(body) > limit
    return (body[:limit] if truncated else body), truncated


def stored_body(body: bytes, mode: str, limit: int) -> tuple[str | None, bool]:
    """What a row keeps of a body under capture's body mode: (text or None, truncated)."""
    if mode == "none":
        return None, False
    truncated = mode == "truncated" and len(body) > limit
    kept = body[:limit] if truncated else body
    return kept.decode("utf-8", errors="replace"), truncated


# ---------------------------------------------------------------- decoding piece by piece

STREAM_ENCODINGS = frozenset({"gzip", "x-gzip", "deflate", "br", "zstd"})


class StreamDecoder:
    """A content-encoding undone piece by piece: a stream as it passes, or a body read without
    holding all of it decoded. Concatenated members (gzip) and frames (zstd) are followed; data
    that cannot be decoded passes on as it came (`failed` says so)."""

    def __init__(self, encoding: str) -> None:
        self.encoding = encoding.strip().lower()
        if self.encoding not in STREAM_ENCODINGS:
            raise ValueError(f"no stream decoder for content-encoding {encoding!r}")
        self.failed = False
        self._raw_deflate = False
        self._started = False
        self._decoder: Any = self._new()

    def _new(self) -> Any:
        if self.encoding in ("gzip", "x-gzip"):
            return zlib.decompressobj(16 + zlib.MAX_WBITS)
        if self.encoding == "deflate":
            return zlib.decompressobj(-zlib.MAX_WBITS if self._raw_deflate else zlib.MAX_WBITS)
        if self.encoding == "br":
            return brotli.Decompressor()
        return zstd.ZstdDecompressor()

    def feed(self, data: bytes) -> bytes:
        if self.failed or not data:
            return data
        try:
            return self._feed(data)
        except Exception:  # every codec has its own error type; what follows is passed on as it came
            self.failed = True
            return data

    def _feed(self, data: bytes) -> bytes:
        if self.encoding == "br":
            return bytes(self._decoder.process(data))
        out = []
        while data:
            if self.encoding == "deflate" and not self._started and (data[0] & 0x0F) != 8:
                self._raw_deflate = True  # raw deflate, as some servers send it, has no zlib header
                self._decoder = self._new()
            self._started = True
            out.append(self._decoder.decompress(data))
            data = b""
            if self._decoder.eof:  # one member or frame ended: the next one, if any, gets a fresh decoder
                data = self._decoder.unused_data
                self._decoder = self._new()
        return b"".join(out)

    def flush(self) -> bytes:
        if self.failed or self.encoding == "br" or self.encoding == "zstd":
            return b""
        try:
            return bytes(self._decoder.flush())
        except Exception:
            return b""
