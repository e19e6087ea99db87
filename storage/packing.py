"""How a flow's headers and bodies are kept: one zstd frame per flow, repeated parts stored once.

A flow's texts (request and response headers, both bodies, the stream's chunk times) are
packed into one byte string and compressed as a single zstd frame, with a dictionary the
writer trains on the first flows a database receives: most of a flow is JSON framing and
header names that every flow repeats, which a per-flow frame alone cannot exploit.

Large parts that applications repeat in every request (a system prompt, the tool
definitions) and whole bodies that repeat (error answers, model lists) are cut out
and kept once in the blobs table by content hash (storage/blobs.py); the frame holds
what is left and the flow's `parts` column says where each cut part goes back.

Every reader gets the texts back exactly as captured: storage/flows.py decodes rows
before returning them. Compression runs in the capture writer's thread, never on the
proxy's event loop.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import struct
import sys
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# Python 3.14 has it in the standard library; before, the backport mitmproxy already needs. A version
# test rather than try/except ImportError, so that mypy follows the branch it checks.
if sys.version_info >= (3, 14):
    from compression import zstd
else:  # pragma: no cover - depends on the Python version
    from backports import zstd

LEVEL = 3  # measured in bench/README.md: higher levels gain ~5 % and cost 3-10x the CPU
DICTIONARY_BYTES = 64 * 1024
DICTIONARY_SAMPLES = 2000  # flows the first dictionary of a database is trained on
MIN_PART = 128  # characters: smaller repeated parts cost more as a reference than they save

# The packed fields, in order. The first five were columns of the flows table before v8.
FIELDS = ("request_headers", "response_headers", "request_body", "response_body", "chunk_times")
REQUEST_BODY, RESPONSE_BODY = FIELDS.index("request_body"), FIELDS.index("response_body")
_REF = struct.Struct("<BII")  # field index, character offset in what is left, blob id


@dataclass(frozen=True)
class Part:
    """A repeated span cut out of a field: it goes back at `offset` of what is left."""

    field: int
    offset: int
    text: str
    digest: bytes


def digest_of(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


# --------------------------------------------------------------------------- repeated parts


def _json_forms(value: object) -> list[str]:
    """How common clients serialise a JSON value: Python's json and httpx, JavaScript's JSON.stringify."""
    forms = []
    for separators in ((", ", ": "), (",", ":")):
        for ascii_only in (True, False):
            form = json.dumps(value, separators=separators, ensure_ascii=ascii_only)
            if form not in forms:
                forms.append(form)
    return forms


def _request_candidates(document: dict) -> Iterable[object]:
    """The values of a request that an application repeats: system prompts, instructions, tools."""
    messages = document.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, dict) and message.get("role") in ("system", "developer"):
                yield message.get("content")
    for name in ("instructions", "tools", "functions"):
        yield document.get(name)


def split_parts(values: list[str | None], repeated_response: bool) -> tuple[list[str | None], list[Part]]:
    """Cut repeated parts out of the bodies; returns what is left of each field and the parts.

    Only spans found verbatim in the body are cut, so putting them back gives the body
    byte for byte; a body written in a way none of the forms match is kept whole.
    """
    parts: list[Part] = []
    values = list(values)
    body = values[REQUEST_BODY]
    if body and len(body) >= MIN_PART and body.startswith("{"):
        try:
            document = json.loads(body)
        except ValueError:
            document = None
        if isinstance(document, dict):
            spans: list[tuple[int, int]] = []
            for value in _request_candidates(document):
                if not value or len(str(value)) < MIN_PART:
                    continue
                for form in _json_forms(value):
                    start = body.find(form)
                    if start >= 0 and not any(s < start + len(form) and start < e for s, e in spans):
                        spans.append((start, start + len(form)))
                        break
            if spans:
                left, kept, removed = [], 0, 0
                for start, end in sorted(spans):
                    left.append(body[kept:start])
                    text = body[start:end]
                    parts.append(Part(REQUEST_BODY, start - removed, text, digest_of(text)))
                    removed += end - start
                    kept = end
                left.append(body[kept:])
                values[REQUEST_BODY] = "".join(left)
    response = values[RESPONSE_BODY]
    if repeated_response and response and len(response) >= MIN_PART:
        parts.append(Part(RESPONSE_BODY, 0, response, digest_of(response)))
        values[RESPONSE_BODY] = ""
    return values, parts


def join_parts(values: list[str | None], refs: Sequence[tuple[int, int, int]], texts: dict[int, str]) -> list:
    """Put cut parts back: `refs` as stored (field, offset, blob id), `texts` by blob id."""
    values = list(values)
    for field, offset, blob_id in reversed(refs):  # from the last: earlier offsets stay valid
        value = values[field] or ""
        values[field] = value[:offset] + texts[blob_id] + value[offset:]
    return values


def encode_refs(refs: Sequence[tuple[int, int, int]]) -> bytes | None:
    return b"".join(_REF.pack(*ref) for ref in refs) or None


def decode_refs(data: bytes | None) -> list[tuple[int, int, int]]:
    return list(_REF.iter_unpack(data)) if data else []


# --------------------------------------------------------------------------- the frame


def serialise(values: Sequence[str | None]) -> bytes:
    """The fields as one byte string: their lengths ("-" for None) on a first line, then each."""
    encoded = [None if v is None else v.encode() for v in values]
    head = ",".join("-" if e is None else str(len(e)) for e in encoded)
    return head.encode() + b"\n" + b"".join(e for e in encoded if e)


def deserialise(data: bytes) -> list[str | None]:
    head, _, rest = data.partition(b"\n")
    values: list[str | None] = []
    position = 0
    for length in head.decode().split(","):
        if length == "-":
            values.append(None)
            continue
        end = position + int(length)
        values.append(rest[position:end].decode())
        position = end
    return values


class Codec:
    """Compresses with a database's newest dictionary; decompresses with whichever a frame names.

    Dictionaries are never changed or deleted once stored, so they are cached by id for the
    life of the process; ids are zstd's own, random 32-bit numbers.
    """

    def __init__(self) -> None:
        self._local = threading.local()  # a compressor is not shared between threads
        self._dictionaries: dict[int, zstd.ZstdDict] = {}
        self._lock = threading.Lock()

    def dictionary(self, conn: sqlite3.Connection, dictionary_id: int) -> zstd.ZstdDict:
        found = self._dictionaries.get(dictionary_id)
        if found is None:
            row = conn.execute("SELECT data FROM compression_dictionaries WHERE id = ?", (dictionary_id,)).fetchone()
            if row is None:
                raise LookupError(f"compression dictionary {dictionary_id} is not in this database")
            found = zstd.ZstdDict(row[0])
            with self._lock:
                self._dictionaries[dictionary_id] = found
        return found

    def compress(self, data: bytes, dictionary_id: int) -> bytes:
        compressors = self._local.__dict__.setdefault("compressors", {})
        compressor = compressors.get(dictionary_id)
        if compressor is None:
            dictionary = self._dictionaries[dictionary_id] if dictionary_id else None
            compressor = compressors[dictionary_id] = zstd.ZstdCompressor(level=LEVEL, zstd_dict=dictionary)
        return compressor.compress(data, zstd.ZstdCompressor.FLUSH_FRAME)

    def decompress(self, conn: sqlite3.Connection, frame: bytes) -> bytes:
        dictionary_id = zstd.get_frame_info(frame).dictionary_id
        if not dictionary_id:
            return zstd.decompress(frame)
        return zstd.decompress(frame, zstd_dict=self.dictionary(conn, dictionary_id))


CODEC = Codec()


def newest_dictionary(conn: sqlite3.Connection) -> int:
    """The id to compress with: the newest stored dictionary, 0 (none) before the first is trained."""
    row = conn.execute("SELECT id FROM compression_dictionaries ORDER BY created_at DESC LIMIT 1").fetchone()
    if row is None:
        return 0
    CODEC.dictionary(conn, row[0])
    return row[0]


class Training(threading.Thread):
    """Trains a dictionary on packed flows; zstd gives up the GIL meanwhile, so capture goes on."""

    def __init__(self, samples: list[bytes]) -> None:
        super().__init__(name="keyrotor-zstd-dictionary", daemon=True)
        self.samples = samples
        self.result: zstd.ZstdDict | None = None
        self.start()

    def run(self) -> None:
        try:
            self.result = zstd.train_dict(self.samples, DICTIONARY_BYTES)
        except zstd.ZstdError:
            self.result = None  # samples too few or too alike


def store_dictionary(conn: sqlite3.Connection, trained: zstd.ZstdDict, now: float) -> int:
    """Store a trained dictionary in the caller's transaction; returns the id to compress with."""
    conn.execute(
        "INSERT OR IGNORE INTO compression_dictionaries (id, data, samples, created_at) VALUES (?, ?, ?, ?)",
        (trained.dict_id, trained.dict_content, DICTIONARY_SAMPLES, now),
    )
    CODEC.dictionary(conn, trained.dict_id)
    return trained.dict_id
