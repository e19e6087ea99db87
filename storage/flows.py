"""Captured flows: batch inserts from the proxy's writer, reads for the UI.

Since schema v8 a flow's headers and bodies are kept packed and compressed in `content`,
with repeated parts in the blobs table (storage/packing.py, storage/blobs.py); every read
function here returns them unpacked, as the columns they were before. Rows stored before
v8 keep the old text columns until storage/conversion.py converts them, and read the same.
"""

from __future__ import annotations

import json
import operator
import re
import sqlite3
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any

from core.records import FlowRecord
from storage import blobs, packing, pg
from storage.sql import insert_many, placeholders

# The one mapping of a FlowRecord to the flows table: every other module reads or writes
# FlowRecords. JSON columns hold lists; the 0/1 columns hold booleans. FLOW_COLUMNS and
# column_values are the record as plain columns, the layout before v8 (and of its tests).
JSON_COLUMNS = frozenset({"request_headers", "response_headers", "chunk_times", "websocket_messages", "client_request"})
BOOLEAN_COLUMNS = frozenset({"stream", "request_body_truncated", "response_body_truncated"})
FLOW_COLUMNS = tuple(f.name for f in fields(FlowRecord) if f.name != "attempt_log")
PACKED_COLUMNS = packing.FIELDS  # kept inside `content` since v8
_SCALAR_COLUMNS = tuple(c for c in FLOW_COLUMNS if c not in PACKED_COLUMNS)
_INSERT_ATTEMPT = (
    "INSERT INTO attempts (flow_id, attempt, upstream_key_id, status, error, started_at, duration_ms,"
    " upstream_id, group_id, model, url)"
)
_INSERT_HEAD = f"INSERT INTO flows ({', '.join(_SCALAR_COLUMNS)}, content, parts)"
FTS_COLUMNS = ("path", "model", "request_body", "response_body")  # what full-text search covers
_INSERT_FTS = f"INSERT INTO flows_fts (rowid, {', '.join(FTS_COLUMNS)})"
_DELETE_FTS = f"INSERT INTO flows_fts (flows_fts, rowid, {', '.join(FTS_COLUMNS)})"
LEGACY_FTS = "flows_fts_legacy"  # the index of rows not converted yet (storage/conversion.py)
# PostgreSQL: the flows' ids are taken from the sequence first (two nodes write at once), and
# the full-text index is a tsvector per flow of the same words FTS5 would index (_Tokenizer).
_PG_NEXT_IDS = "SELECT nextval(pg_get_serial_sequence('flows', 'id')) FROM generate_series(1, ?) ORDER BY 1"
_PG_INSERT_HEAD = f"INSERT INTO flows /* ids from the sequence */ (id, {', '.join(_SCALAR_COLUMNS)}, content, parts)"
_PG_INSERT_FTS = "INSERT INTO flows_fts (id, document)"
# id + 0: PostgreSQL would otherwise read min(id) and max(id) off the ids' index, walking it
# from either end past every flow outside the range; this reads the range from started_at's.
_PG_RANGE_IDS = "SELECT min(id + 0), max(id + 0) FROM flows WHERE started_at >= ? AND started_at < ?"
_GIN_INDEX = "flows_fts_document"  # the GIN index of the tsvectors (storage/pg_schema.py), as EXPLAIN names it
PG_FEW_MATCHES = 5000  # a search with at most this many matches reads them from the GIN index first
PG_DOCUMENT_BYTES = 900_000  # PostgreSQL's tsvector holds at most 1 MB: words past this are not indexed

# Columns the list views need; bodies and headers stay out of them.
SUMMARY_COLUMNS = (
    "id, flow_id, started_at, duration_ms, method, path, status, model, stream,"
    " client_key_id, upstream_key_id, attempts, total_tokens, error, upstream_id, group_id, fallback_model,"
    " client_id, refusal, tags, session, prompt_preview, answer_preview"
)


_ALL_FIELDS = operator.attrgetter(*FLOW_COLUMNS)  # one C call per record, in the writer thread
_SCALAR_FIELDS = operator.attrgetter(*_SCALAR_COLUMNS)
_PACKED_FIELDS = operator.attrgetter(*PACKED_COLUMNS)
_JSON_AT = [i for i, name in enumerate(FLOW_COLUMNS) if name in JSON_COLUMNS]
_BOOLEAN_AT = [i for i, name in enumerate(FLOW_COLUMNS) if name in BOOLEAN_COLUMNS]
_SCALAR_BOOLEAN_AT = [i for i, name in enumerate(_SCALAR_COLUMNS) if name in BOOLEAN_COLUMNS]
_SCALAR_JSON_AT = [i for i, name in enumerate(_SCALAR_COLUMNS) if name in JSON_COLUMNS]
_PACKED_JSON_AT = [i for i, name in enumerate(PACKED_COLUMNS) if name in JSON_COLUMNS]


def column_values(record: FlowRecord) -> list:
    """The record as a plain flows row (the layout before v8), in FLOW_COLUMNS order."""
    values = list(_ALL_FIELDS(record))
    for i in _JSON_AT:
        if values[i] is not None:
            values[i] = json.dumps(values[i])
    for i in _BOOLEAN_AT:
        values[i] = int(bool(values[i]))
    return values


def packed_texts(record: FlowRecord) -> list[str | None]:
    """The record's PACKED_COLUMNS as the text the columns held before v8."""
    values = list(_PACKED_FIELDS(record))
    for i in _PACKED_JSON_AT:
        if values[i] is not None:
            values[i] = json.dumps(values[i])
    return values


def repeats_its_response(method: str, status: int | None) -> bool:
    """Answers that many flows share word for word: model lists and the like, and errors."""
    return method == "GET" or (status is not None and status >= 400)


class FlowPacker:
    """Packs flows for one database: its compression dictionary and the parts already stored.

    The capture writer keeps one for its connection; the first DICTIONARY_SAMPLES flows a
    database gets are compressed without a dictionary and train the first one.
    """

    def __init__(self) -> None:
        self.dictionary_id: int | None = None
        self.blobs = blobs.BlobWriter()
        self._samples: list[bytes] = []
        self._training: packing.Training | None = None
        self._trained: packing.zstd.ZstdDict | None = None  # trained by this packer
        self._gave_up = False

    def pack(
        self, conn: sqlite3.Connection, rows: list[tuple[str, int | None, list[str | None]]]
    ) -> list[tuple[bytes, bytes | None]]:
        """(method, status, texts) per flow → (content, parts) per flow, in the caller's transaction."""
        if self.dictionary_id is None:
            self.dictionary_id = packing.newest_dictionary(conn)
        if self._trained is not None:
            # Stored again with every batch (a no-op once there): the batch that first stored it
            # may have been rolled back, and no frame may name a dictionary the database lacks.
            packing.store_dictionary(conn, self._trained, time.time())
        split = [packing.split_parts(texts, repeats_its_response(method, status)) for method, status, texts in rows]
        serialised = [packing.serialise(left) for left, _ in split]
        if not self.dictionary_id and not self._gave_up:
            self._train(conn, serialised)
        ids = self.blobs.add(conn, (p for _, parts in split for p in parts), self.dictionary_id)
        return [
            (
                packing.CODEC.compress(data, self.dictionary_id),
                packing.encode_refs([(p.field, p.offset, ids[p.digest]) for p in parts]),
            )
            for data, (_, parts) in zip(serialised, split, strict=True)
        ]

    def _train(self, conn: sqlite3.Connection, serialised: list[bytes]) -> None:
        """Collect samples, train on them in a thread of its own (seconds of CPU, without the GIL),
        and start using the dictionary with the first batch after it is ready."""
        if self._training is None:
            self._samples += serialised[: packing.DICTIONARY_SAMPLES - len(self._samples)]
            if len(self._samples) >= packing.DICTIONARY_SAMPLES:
                self._training = packing.Training(self._samples)
                self._samples = []
            return
        if self._training.is_alive():
            return
        trained, self._training = self._training.result, None
        if trained is None:
            self._gave_up = True  # too few or too alike to train on: no dictionary, and no retrying
            return
        self._trained = trained
        self.dictionary_id = packing.store_dictionary(conn, trained, time.time())


def insert_batch(conn: sqlite3.Connection, records: Iterable[FlowRecord], packer: FlowPacker | None = None) -> None:
    """Insert flows and add them to the per-key usage counters, in the caller's transaction.

    A few statements per batch, not a few per row: see storage.sql.insert_many.
    """
    records = list(records)
    if not records:
        return
    packer = packer or FlowPacker()
    texts = [packed_texts(r) for r in records]
    packed = packer.pack(conn, [(r.method, r.status, t) for r, t in zip(records, texts, strict=True)])
    rows = []
    for record, (content, parts) in zip(records, packed, strict=True):
        values = list(_SCALAR_FIELDS(record))
        for i in _SCALAR_BOOLEAN_AT:
            values[i] = int(bool(values[i]))
        for i in _SCALAR_JSON_AT:  # a WebSocket session's messages: kept apart from the packed texts
            if values[i] is not None:
                values[i] = json.dumps(values[i])
        rows.append([*values, content, parts])
    if pg.is_postgres(conn):
        ids = [r[0] for r in conn.execute(_PG_NEXT_IDS, (len(rows),))]
        insert_many(conn, _PG_INSERT_HEAD, [[i, *row] for i, row in zip(ids, rows, strict=True)])
        insert_many(
            conn,
            _PG_INSERT_FTS,
            [
                (i, _tokenizer.document((r.path, r.model, t[packing.REQUEST_BODY], t[packing.RESPONSE_BODY])))
                for i, r, t in zip(ids, records, texts, strict=True)
            ],
        )
    else:
        first_id = conn.execute("SELECT coalesce(max(id), 0) + 1 FROM flows").fetchone()[0]
        insert_many(conn, _INSERT_HEAD, rows)  # one writer: the batch takes the ids after the largest
        ids = list(range(first_id, first_id + len(rows)))
        insert_many(
            conn,
            _INSERT_FTS,
            [
                (i, r.path, r.model, t[packing.REQUEST_BODY], t[packing.RESPONSE_BODY])
                for i, r, t in zip(ids, records, texts, strict=True)
            ],
        )
    insert_many(
        conn,
        "INSERT OR IGNORE INTO flow_tags (tag, flow)",
        [(tag, i) for i, r in zip(ids, records, strict=True) if r.tags for tag in r.tags.split(",")],
    )
    insert_attempts(conn, records)
    for table, column in (("upstream_keys", "upstream_key_id"), ("client_keys", "client_key_id")):
        usage = [(key_id, *sums) for key_id, sums in _usage_by(records, column).items()]
        if not usage:
            continue
        # One UPDATE for every key of the batch (UPDATE ... FROM needs SQLite 3.33).
        conn.execute(
            f"UPDATE {table} SET requests = requests + u.column2, prompt_tokens = prompt_tokens + u.column3,"
            " completion_tokens = completion_tokens + u.column4,"
            " last_used_at = max(coalesce(last_used_at, 0), u.column5), cost = cost + u.column6"
            f" FROM (VALUES {placeholders(len(usage), 6)}) AS u WHERE {table}.id = u.column1",
            [v for row in usage for v in row],
        )


# --------------------------------------------------------------------------- reading packed rows


def unpack_row(conn: sqlite3.Connection, row: sqlite3.Row, known_parts: dict[int, str] | None = None) -> dict:
    """A row with `content` and `parts` as the plain columns it stands for (rows before v8 as they are)."""
    unpacked = dict(row)
    content = unpacked.pop("content", None)
    refs = packing.decode_refs(unpacked.pop("parts", None))
    if content is None:
        return unpacked
    values = packing.deserialise(packing.CODEC.decompress(conn, content))
    if refs:
        values = packing.join_parts(values, refs, blobs.texts_of(conn, (r[2] for r in refs), known_parts))
    for name, value in zip(PACKED_COLUMNS, values, strict=True):
        unpacked[name] = value
    return unpacked


def _selected(columns: str) -> tuple[list[str], bool]:
    """The requested columns as SQL, and whether any of them is packed (then content and parts too)."""
    names = [c.strip() for c in columns.split(",")]
    packed = "*" in names or any(n in PACKED_COLUMNS for n in names)
    if packed and "*" not in names:
        names += ["content", "parts"]
    return names, packed


def insert_attempts(conn: sqlite3.Connection, records: list[FlowRecord]) -> None:
    """Attempt rows of retried flows; each failed attempt also counts as a request on its key."""
    attempts = [(r.flow_id, a) for r in records for a in r.attempt_log]
    if not attempts:
        return
    insert_many(
        conn,
        _INSERT_ATTEMPT,
        [
            (
                flow_id,
                a.attempt,
                a.key_id,
                a.status,
                a.error,
                a.started_at,
                a.duration_ms,
                a.upstream_id,
                a.group_id,
                a.model,
                a.url,
            )
            for flow_id, a in attempts
        ],
    )
    failed = [a for r in records for a in r.attempt_log[:-1]]  # the last one is the flow's own
    conn.executemany(
        "UPDATE upstream_keys SET requests = requests + 1, last_used_at = max(coalesce(last_used_at, 0), ?)"
        " WHERE id = ?",
        [(a.started_at, a.key_id) for a in failed],
    )


def attempts_of(conn: sqlite3.Connection, flow_id: str) -> list[sqlite3.Row]:
    return conn.execute(
        "SELECT attempt, upstream_key_id, status, error, started_at, duration_ms, upstream_id, group_id, model, url"
        " FROM attempts"
        " WHERE flow_id = ? ORDER BY attempt LIMIT 100",
        (flow_id,),
    ).fetchall()


def _usage_by(records: list[FlowRecord], column: str) -> dict[int, list]:
    usage: dict[int, list] = defaultdict(lambda: [0, 0, 0, 0.0, 0.0])
    for record in records:
        key_id = getattr(record, column)
        if key_id is None:
            continue
        entry = usage[key_id]
        entry[0] += 1
        entry[1] += record.prompt_tokens or 0
        entry[2] += record.completion_tokens or 0
        entry[3] = max(entry[3], record.started_at)
        entry[4] += record.cost or 0.0
    return usage


def recent_flows(conn: sqlite3.Connection, limit: int = 50, before_id: int | None = None) -> list[sqlite3.Row]:
    """Newest first; `before_id` continues a page (keyset pagination, no OFFSET)."""
    limit = max(1, min(limit, 500))
    if before_id is None:
        return conn.execute(f"SELECT {SUMMARY_COLUMNS} FROM flows ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
    return conn.execute(
        f"SELECT {SUMMARY_COLUMNS} FROM flows WHERE id < ? ORDER BY id DESC LIMIT ?", (before_id, limit)
    ).fetchall()


STATUS_CLASSES = {"2xx": (200, 300), "3xx": (300, 400), "4xx": (400, 500), "5xx": (500, 600)}


@dataclass(frozen=True)
class FlowFilter:
    """What the flows page and its JSON twin filter on; every field is optional."""

    q: str | None = None  # full-text search over path, model and both bodies
    status: str | None = None  # 2xx, 3xx, 4xx, 5xx, one code such as "429", or "error" (no response at all)
    model: str | None = None
    path: str | None = None  # a prefix
    client_key_id: int | None = None
    client_id: int | None = None  # the client, whichever of its keys
    upstream_key_id: int | None = None
    upstream_id: int | None = None
    group_id: int | None = None
    stream: bool | None = None
    refusal: str | None = None  # the code keyrotor refused with ("any": every refused flow)
    tag: str | None = None  # one of the flow's x-keyrotor-tags
    session: str | None = None  # its x-keyrotor-session
    since: float | None = None
    until: float | None = None
    after_id: int | None = None  # only flows newer than this (the page's live updates)

    def is_empty(self) -> bool:
        return all(getattr(self, f.name) is None for f in fields(self))


def fts_query(text: str) -> str | None:
    """User text as an FTS5 query: every word must appear, taken literally (no operators, no syntax errors)."""
    terms = [t for t in text.split() if t]
    if not terms:
        return None
    return " ".join(_quoted(t) for t in terms[:20])


def _quoted(term: str) -> str:
    return '"' + term.replace('"', '""') + '"'


class _Tokenizer(threading.local):
    """FTS5's own tokenizer, on a private in-memory database: the index's rules, not a copy of them.

    The index keeps no positions (detail=none: a third of the size), so a word that FTS5
    reads as several tokens ("gpt-4o", "/v1/chat") cannot be asked for as a phrase there. It
    is asked for as its tokens, and the candidates are checked against the phrase here, in
    a full-detail index of just those rows: exactly the matches a full index would give.
    """

    def __init__(self) -> None:
        self.conn = sqlite3.connect(":memory:")
        self.conn.execute("CREATE VIRTUAL TABLE words USING fts5(w)")
        self.conn.execute("CREATE VIRTUAL TABLE words_seen USING fts5vocab(words, 'instance')")
        self.conn.execute("CREATE VIRTUAL TABLE words_known USING fts5vocab(words, 'row')")
        self.conn.execute(f"CREATE VIRTUAL TABLE checked USING fts5({', '.join(FTS_COLUMNS)})")

    def tokens(self, term: str) -> list[str]:
        with self.conn:
            self.conn.execute("INSERT INTO words (rowid, w) VALUES (1, ?)", (term,))
            found = [r[0] for r in self.conn.execute("SELECT term FROM words_seen ORDER BY offset")]
            self.conn.execute("DELETE FROM words")
        return found

    def document(self, texts: Iterable[str | None]) -> str:
        """The distinct words FTS5 would index in `texts`, as PostgreSQL's tsvector reads them."""
        text = "\n".join(t for t in texts if t)
        if text.isascii():
            # In ASCII, FTS5's unicode61 tokens are exactly the runs of letters and digits, folded to lower case.
            return tsvector_text(sorted(set(_ASCII_TOKEN.findall(text.lower()))), plain=True)
        with self.conn:
            self.conn.execute("INSERT INTO words (rowid, w) VALUES (1, ?)", (text,))
            terms = [r[0] for r in self.conn.execute("SELECT term FROM words_known")]
            self.conn.execute("DELETE FROM words")
        return tsvector_text(terms)

    def matching(self, rows: list[tuple], query: str) -> set[int]:
        """Ids of `rows` (id, path, model, request body, response body) that a full index would match."""
        with self.conn:
            self.conn.executemany(f"INSERT INTO checked (rowid, {', '.join(FTS_COLUMNS)}) VALUES (?, ?, ?, ?, ?)", rows)
            found = {r[0] for r in self.conn.execute("SELECT rowid FROM checked WHERE checked MATCH ?", (query,))}
            self.conn.execute("DELETE FROM checked")
        return found


_tokenizer = _Tokenizer()
_ASCII_TOKEN = re.compile("[a-z0-9]+")


def _lexeme(word: str) -> str:
    return "'" + word.replace("\\", "\\\\").replace("'", "''") + "'"


def tsvector_text(words: list[str], plain: bool = False) -> str:
    """Words as a tsvector literal, up to PG_DOCUMENT_BYTES (PostgreSQL refuses longer ones).

    `plain`: the words are ASCII letters and digits, which need no quoting."""
    if plain:
        joined = " ".join(words)
        if len(joined) * 2 < PG_DOCUMENT_BYTES and max(map(len, words), default=0) < 2047:  # words: a list
            return joined
    out, size = [], 0
    for word in words:
        length = len(word.encode())
        if length >= 2047:  # PostgreSQL's longest lexeme
            continue
        size += length + 8  # a lexeme's share of the tsvector's size, roughly
        if size > PG_DOCUMENT_BYTES:
            break
        out.append(word if plain else _lexeme(word))
    return " ".join(out)


def document_of(texts: Iterable[str | None]) -> str:
    """A flow's full-text entry on PostgreSQL (flows_fts.document): path, model and both bodies."""
    return _tokenizer.document(texts)


def tsquery_text(text: str) -> str | None:
    """User text as a tsquery that every flow FTS5 would match also matches: all their words' tokens."""
    words = [t for term in text.split()[:20] for t in _tokenizer.tokens(term)]
    if not words:
        return None
    return " & ".join(_lexeme(w) for w in dict.fromkeys(words))


def _index_query(text: str) -> tuple[str, _Phrases | None] | None:
    """The query for the index without positions, and the phrases its candidates must hold."""
    terms = [t for t in text.split() if t][:20]
    if not terms:
        return None
    parts, phrases, token_lists = [], [], []
    for term in terms:
        tokens = _tokenizer.tokens(term)
        token_lists.append(tokens)
        if len(tokens) > 1:
            phrases.append(term)
            parts += [_quoted(t) for t in tokens]
        else:
            parts.append(_quoted(term))  # FTS5 reads one token (or none) the same in either index
    query = " ".join(_quoted(t) for t in terms)
    return " ".join(parts), (_Phrases(phrases, query, token_lists) if phrases else None)


# Next to a literal occurrence, these end a token for FTS5's unicode61 tokenizer: every
# ASCII character but letters and digits. Other characters may or may not (Unicode
# categories), so an occurrence beside one is left to the exact check.
_TOKEN_OR_UNKNOWN = "A-Za-z0-9\x80-\U0010ffff"
_EDGE_SEPARATORS = re.compile("^[^A-Za-z0-9]+|[^A-Za-z0-9]+$")


def _ascii_phrase(tokens: list[str]) -> re.Pattern[str]:
    """Where FTS5 would read `tokens` (ASCII) side by side, in lower-cased ASCII text.

    The pattern starts with the first token's letters, not a look-behind, so that re's
    literal search finds the places worth trying; the look-behind after them then asks
    for a separator (or the text's edge) before.
    """
    first, rest = re.escape(tokens[0]), "".join(f"[^a-z0-9]+{re.escape(t)}" for t in tokens[1:])
    return re.compile(f"{first}(?<![a-z0-9]{first}){rest}(?![a-z0-9])")


class _Phrases:
    """The words of a query that FTS5 reads as several tokens, and how a candidate is checked.

    A candidate whose texts are all ASCII is decided here, exactly: its tokens are then the
    runs of letters and digits, lower-cased (see _Tokenizer.document), so each word of the
    query is found where its tokens stand separated only by other characters. That is also
    the check that costs least: a phrase of common words seldom side by side ("gpt-mini")
    fails it in hundreds of candidates per page.

    Otherwise, a word found literally (ASCII case aside, and the separators it starts or
    ends with) with a separator or the text's edge on both sides is, token for token, the
    phrase: no index needed. A candidate where that fails for some word (the word not
    written so, or next to non-ASCII text) goes to the exact check in _Tokenizer, which sees
    what a full index would; so do all candidates when a word is not ASCII.
    """

    def __init__(self, words: list[str], query: str, token_lists: list[list[str]]) -> None:
        self.query = query
        # A word without tokens ("-") is left out of FTS5's AND, so out of this check too.
        self.ascii: list[re.Pattern[str]] | None = None
        if all(t.isascii() for tokens in token_lists for t in tokens):
            self.ascii = [_ascii_phrase(tokens) for tokens in token_lists if tokens]
        cores = [_EDGE_SEPARATORS.sub("", w) for w in words if w.isascii()]
        self.literal = [
            re.compile(f"(?<![{_TOKEN_OR_UNKNOWN}]){re.escape(c)}(?![{_TOKEN_OR_UNKNOWN}])", re.IGNORECASE | re.ASCII)
            for c in cores
        ]
        self.all_literal = len(self.literal) == len(words)

    def matching(self, rows: list[tuple]) -> set[int]:
        """Ids of `rows` (id, path, model, request body, response body) that a full index would match."""
        found, undecided = set(), []
        for row in rows:
            texts = [t for t in row[1:] if t]
            if self.ascii is None or not all(t.isascii() for t in texts):
                undecided.append(row)
                continue
            lowered = [t.lower() for t in texts]
            if all(any(p.search(t) for t in lowered) for p in self.ascii):
                found.add(row[0])
        if not undecided:
            return found
        return found | self._matching_unicode(undecided)

    def _matching_unicode(self, rows: list[tuple]) -> set[int]:
        if not self.all_literal:
            return _tokenizer.matching(rows, self.query)
        found, unsure = set(), []
        for row in rows:
            texts = [t for t in row[1:] if t]
            if all(any(p.search(t) for t in texts) for p in self.literal):
                found.add(row[0])
            else:
                unsure.append(row)
        return found | (_tokenizer.matching(unsure, self.query) if unsure else set())


def _conditions(f: FlowFilter, table: str, old: tuple[int, int] | None = None) -> tuple[list[str], list[Any]]:
    """WHERE terms of `f`; `old` is the id range (low, high] of rows not converted yet (see flows_legacy)."""
    where: list[str] = []
    params: list[Any] = []
    if f.status == "error":
        where.append(f"{table}.status IS NULL")
    elif f.status in STATUS_CLASSES:
        low, high = STATUS_CLASSES[f.status]
        where.append(f"{table}.status >= ? AND {table}.status < ?")
        params += [low, high]
    elif f.status and f.status.isdecimal():  # one code, e.g. 429
        where.append(f"{table}.status = ?")
        params.append(int(f.status))
    for column in ("model", "client_key_id", "client_id", "upstream_key_id", "upstream_id", "group_id"):
        value = getattr(f, column)
        if value is None:
            continue
        if column == "client_id" and old:  # rows before v9 get their client_id as they are converted
            where.append(
                f"({table}.client_id = ? OR ({table}.client_id IS NULL AND {table}.client_key_id = ?"
                f" AND {table}.id > ? AND {table}.id <= ?))"
            )
            params += [value, value, *old]
        else:
            where.append(f"{table}.{column} = ?")
            params.append(value)
    if f.path:
        # A range rather than LIKE: exact prefix, no wildcard surprises from "%" or "_" in the input.
        where.append(f"{table}.path >= ? AND {table}.path < ?")
        params += [f.path, f.path + "\U0010ffff"]
    if f.stream is not None:
        where.append(f"{table}.stream = ?")
        params.append(int(f.stream))
    if f.refusal == "any":
        where.append(f"{table}.refusal IS NOT NULL")
    elif f.refusal:
        where.append(f"{table}.refusal = ?")
        params.append(f.refusal)
    if f.session is not None:
        where.append(f"{table}.session = ?")
        params.append(f.session)
    if f.tag is not None:
        where.append(f"{table}.id IN (SELECT flow FROM flow_tags WHERE tag = ?)")
        params.append(f.tag)
    if f.since is not None:
        where.append(f"{table}.started_at >= ?")
        params.append(f.since)
    if f.until is not None:
        where.append(f"{table}.started_at < ?")
        params.append(f.until)
    return where, params


# A time range this many rows wide or narrower is turned into the range of ids it covers.
NARROW_RANGE_ROWS = 200_000


def _id_range(conn: sqlite3.Connection, f: FlowFilter, before_id: int | None) -> tuple[int, int] | None:
    """Bounds (inclusive) on the ids a query can return; None when nothing can match.

    Each filter is one index walk newest first, by id: the live updates' `after`, the next
    page's `before`, and a time range, whose rows lie in an id range because ids follow the
    order in which flows ended. A row id bound is what lets an index on model or key, or the
    full-text index, start and stop at the right place instead of walking every newer row.
    """
    low, high = 1, 2**63 - 1
    if f.after_id is not None:
        low = f.after_id + 1
    if before_id is not None:
        high = before_id - 1
    if f.since is not None or f.until is not None:
        since = f.since if f.since is not None else float("-inf")
        until = f.until if f.until is not None else float("inf")
        if _estimated_rows(conn, since, until) <= NARROW_RANGE_ROWS:
            first, last = conn.execute(
                _PG_RANGE_IDS
                if pg.is_postgres(conn)
                else "SELECT min(id), max(id) FROM flows WHERE started_at >= ? AND started_at < ?",
                (since, until),
            ).fetchone()  # an index-only walk of the range
            if first is None:
                return None
            low, high = max(low, first), min(high, last)
    return (low, high) if low <= high else None


def _estimated_rows(conn: sqlite3.Connection, since: float, until: float) -> int:
    """Roughly how many flows started in [since, until): the ids at its two ends, two index seeks."""
    first = conn.execute("SELECT id FROM flows WHERE started_at >= ? ORDER BY started_at LIMIT 1", (since,)).fetchone()
    last = conn.execute(
        "SELECT id FROM flows WHERE started_at < ? ORDER BY started_at DESC LIMIT 1", (until,)
    ).fetchone()
    if first is None or last is None:
        return 0
    return abs(last[0] - first[0])


def search_flows(
    conn: sqlite3.Connection,
    f: FlowFilter,
    limit: int = 50,
    before_id: int | None = None,
    columns: str = SUMMARY_COLUMNS,
) -> list:
    """Newest first, filtered; `before_id` continues a page (keyset pagination, never OFFSET).

    Rows come back as sqlite3.Row, or as dicts with headers and bodies unpacked when
    `columns` asks for any of them ("*" included). Every match, however long the walk:
    see search_page for what a UI page should call.
    """
    return _search(conn, f, limit, before_id, columns, None).rows


@dataclass(frozen=True)
class Page:
    rows: list
    # Set when the walk stopped at its budget of phrase checks with fewer rows than asked
    # for: every flow from this id up has been looked at, the next page goes on below it.
    checked_down_to: int | None = None


def search_page(
    conn: sqlite3.Connection,
    f: FlowFilter,
    limit: int = 50,
    before_id: int | None = None,
    columns: str = SUMMARY_COLUMNS,
) -> Page:
    """search_flows for one page a person waits for: at most PHRASE_CHECK_BUDGET candidates checked."""
    return _search(conn, f, limit, before_id, columns, PHRASE_CHECK_BUDGET)


def _search(
    conn: sqlite3.Connection, f: FlowFilter, limit: int, before_id: int | None, columns: str, budget: int | None
) -> Page:
    limit = max(1, min(limit, 1000))
    ids = _id_range(conn, f, before_id)
    if ids is None:
        return Page([])
    names, packed = _selected(columns)
    selected = ", ".join(f"flows.{n}" for n in names)
    checked_down_to = None
    if not f.q or fts_query(f.q) is None:
        where, params = _conditions(f, "flows", _legacy_range(conn) if f.client_id is not None else None)
        where.append("flows.id BETWEEN ? AND ?")
        sql = f"SELECT {selected} FROM flows WHERE {' AND '.join(where)} ORDER BY flows.id DESC LIMIT ?"
        rows = conn.execute(sql, (*params, *ids, limit)).fetchall()
    else:
        rows, checked_down_to = _text_search(conn, f, f.q, ids, limit, selected, budget)
    if packed:
        known: dict[int, str] = {}
        _read_parts(conn, rows, known)
        rows = [unpack_row(conn, row, known) for row in rows]
    return Page(rows, checked_down_to)


def _read_parts(conn: sqlite3.Connection, rows: list, known: dict[int, str]) -> None:
    """The repeated parts of all `rows` in one read, rather than one per row as each is unpacked."""
    blobs.texts_of(conn, (ref[2] for row in rows for ref in packing.decode_refs(row["parts"])), known)


def _legacy_range(conn: sqlite3.Connection) -> tuple[int, int] | None:
    """Ids (low, high] of rows still in the layout before v8, indexed in LEGACY_FTS; None when none are."""
    try:
        row = conn.execute("SELECT low, high FROM flows_legacy").fetchone()
    except sqlite3.OperationalError:  # a database before v8 (the UI reading while the proxy migrates)
        return None
    return (row[0], row[1]) if row and row[0] < row[1] else None


def _text_search(
    conn: sqlite3.Connection,
    f: FlowFilter,
    text: str,
    ids: tuple[int, int],
    limit: int,
    selected: str,
    budget: int | None,
) -> tuple[list, int | None]:
    """Full-text search, newest match first: each index walks its rowids in order and stops at LIMIT."""
    query, index = fts_query(text), _index_query(text)
    if query is None or index is None:  # no word to search for; the caller sends only text that has one
        return [], None
    low, high = ids
    rows = []
    legacy = _legacy_range(conn)
    if legacy and legacy[0] + 1 <= high and low <= legacy[1]:
        # Rows not converted yet: their old index (positions and all) answers the query as it is.
        span = (max(low, legacy[0] + 1), min(high, legacy[1]))
        rows += _walk(conn, f, LEGACY_FTS, query, None, span, limit, selected, legacy)[0]
    index_query, check = index
    if pg.is_postgres(conn):
        index_query = tsquery_text(text) or ""
    found, checked_down_to = _walk(conn, f, "flows_fts", index_query, check, ids, limit, selected, legacy, budget)
    rows += found
    if checked_down_to is not None:  # what lies below is the next page's, from either index
        rows = [r for r in rows if r["id"] >= checked_down_to]
    if legacy:
        rows.sort(key=lambda r: r["id"], reverse=True)
    return rows[:limit], checked_down_to


CHECK_PAGE = 200  # candidates read per round, at most, when phrases must be checked
# Candidates one UI page may check: a phrase whose words are common but seldom adjacent
# ("gpt-mini": 400,000 candidates in a million flows, none a match) would otherwise walk
# them all, minutes long. 1,500 take about 0.2 s; the page says where it stopped.
PHRASE_CHECK_BUDGET = 1500


def _walk(
    conn: sqlite3.Connection,
    f: FlowFilter,
    index: str,
    query: str,
    check: _Phrases | None,
    ids: tuple[int, int],
    limit: int,
    selected: str,
    legacy: tuple[int, int] | None = None,
    budget: int | None = None,
) -> tuple[list, int | None]:
    """The matches, and where the walk stopped when `budget` candidates were checked first.

    `legacy` is the id range of rows not converted yet: the old index answers for them.
    """
    where, params = _conditions(f, "flows", legacy)
    if pg.is_postgres(conn):
        low, high = ids
        # A rare word: walking the ids newest first and testing each flow's words would read
        # them all (PostgreSQL's planner takes that walk for ORDER BY id LIMIT). Its few
        # matches are found from the GIN index first, unordered; the walk then visits only them.
        # When the planner would not ask the GIN index for them, it expects more than enough
        # matches in the flows it reads first: asking would read them (50-200 ms for common
        # words) only to learn that the walk is the way, so the walk goes first.
        probe = "SELECT id FROM flows_fts WHERE document @@ ?::tsquery AND id BETWEEN ? AND ? LIMIT ?"
        probe_params = (query, low, high, PG_FEW_MATCHES + 1)
        plan = [r[0] for r in conn.execute("EXPLAIN " + probe, probe_params)]
        few = conn.execute(probe, probe_params).fetchall() if any(_GIN_INDEX in p for p in plan) else None
        if few is not None and not few:
            return [], None
        where.insert(0, "flows_fts.document @@ ?::tsquery")
        params.insert(0, query)
        if few is not None and len(few) <= PG_FEW_MATCHES:
            where.append(f"flows_fts.id IN ({', '.join(str(int(r[0])) for r in few)})")
        where.append("flows_fts.id BETWEEN ? AND ?")
        source = (
            "FROM flows_fts JOIN flows ON flows.id = flows_fts.id"
            f" WHERE {' AND '.join(where)} ORDER BY flows_fts.id DESC LIMIT ?"
        )
        return _walk_rounds(conn, source, params, selected, check, ids, limit, budget)
    where.insert(0, f"{index} MATCH ?")
    params.insert(0, query)
    if legacy and index != LEGACY_FTS:  # the rows the old index answers for
        where.append(f"{index}.rowid NOT BETWEEN ? AND ?")
        params += [legacy[0] + 1, legacy[1]]
    where.append(f"{index}.rowid BETWEEN ? AND ?")  # bounds on flows.id would not reach the full-text walk
    source = (
        f"FROM {index} JOIN flows ON flows.id = {index}.rowid"
        f" WHERE {' AND '.join(where)} ORDER BY {index}.rowid DESC LIMIT ?"
    )
    return _walk_rounds(conn, source, params, selected, check, ids, limit, budget)


_CHECKED_COLUMNS = "flows.path, flows.model, flows.request_body, flows.response_body, flows.content, flows.parts"


def _walk_rounds(
    conn: sqlite3.Connection,
    source: str,
    params: list,
    selected: str,
    check: _Phrases | None,
    ids: tuple[int, int],
    limit: int,
    budget: int | None,
) -> tuple[list, int | None]:
    """`source`: the walk's FROM ... LIMIT ?, its bounds and limit left last."""
    low, high = ids
    if check is None:
        rows = conn.execute(f"SELECT flows.id AS id_, {selected} {source}", (*params, low, high, limit))
        return [_without_id(r) for r in rows], None
    # A round reads its candidates with the texts to check, in one query; the columns asked
    # for are then read for its matches only (a phrase of common words seldom side by side
    # has hundreds of candidates a page and few matches, if any).
    walk = f"SELECT flows.id AS id_, {_CHECKED_COLUMNS} {source}"
    found: list = []
    checked = 0
    # Common words are mostly written as asked ("gpt-4o"): the first round reads about
    # what the page needs; rounds double while candidates keep failing the check.
    page_size = min(CHECK_PAGE, limit + 10)
    while len(found) < limit and low <= high:
        page = conn.execute(walk, (*params, low, high, page_size)).fetchall()
        if not page:
            break
        found += _rows_of(conn, selected, check.matching(_texts_of(conn, page)))
        checked += len(page)
        if len(page) < page_size:
            break
        high = page[-1]["id_"] - 1
        if budget is not None and checked >= budget and len(found) < limit:
            return found, page[-1]["id_"]
        page_size = min(CHECK_PAGE, page_size * 2)
    return found[:limit], None


def _without_id(row: sqlite3.Row) -> dict:
    """A result row keyed by column name, like sqlite3.Row, without the helper column of the walk."""
    return {k: row[k] for k in row.keys() if k != "id_"}


def _rows_of(conn: sqlite3.Connection, selected: str, row_ids: set[int]) -> list[dict]:
    """The `selected` columns of these flows, newest first."""
    if not row_ids:
        return []
    rows = conn.execute(
        f"SELECT {selected} FROM flows WHERE flows.id IN ({', '.join('?' * len(row_ids))}) ORDER BY flows.id DESC",
        sorted(row_ids),
    )
    return [{k: r[k] for k in r.keys()} for r in rows]


def _texts_of(conn: sqlite3.Connection, page: list) -> list[tuple]:
    """(id, path, model, request body, response body) of each candidate of a round, unpacked."""
    known: dict[int, str] = {}
    _read_parts(conn, page, known)
    texts = []
    for row in page:
        plain = unpack_row(conn, row, known)
        texts.append((plain["id_"], plain["path"], plain["model"], plain["request_body"], plain["response_body"]))
    return texts


def get_flow(conn: sqlite3.Connection, flow_row_id: int) -> dict | None:
    row = conn.execute("SELECT * FROM flows WHERE id = ?", (flow_row_id,)).fetchone()
    return None if row is None else unpack_row(conn, row)


def count_flows(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT count(*) FROM flows").fetchone()[0]


PURGE_CHUNK = 1000  # rows per transaction: the writer's next batch never waits long


def used_bytes(conn: sqlite3.Connection) -> int:
    """The database's pages in use: its size less the free pages new rows will reuse first."""
    if pg.is_postgres(conn):
        # What the rows hold: PostgreSQL keeps a deleted row's space until a vacuum, and reuses
        # it then; the file sizes would not shrink as retention deletes.
        return conn.execute(
            "SELECT (SELECT coalesce(sum(pg_column_size(f.*)), 0) FROM flows f)"
            " + (SELECT coalesce(sum(pg_column_size(x.*)), 0) FROM flows_fts x)"
            " + (SELECT coalesce(sum(pg_column_size(b.*)), 0) FROM blobs b)"
        ).fetchone()[0]
    pages = conn.execute("PRAGMA page_count").fetchone()[0] - conn.execute("PRAGMA freelist_count").fetchone()[0]
    return pages * conn.execute("PRAGMA page_size").fetchone()[0]


def size_surplus(conn: sqlite3.Connection, max_bytes: int) -> int:
    """How many of the oldest flows to purge for the database to use at most `max_bytes`, at its average row.

    Computed once per purge round: deleting frees pages for new rows only as the pages empty,
    so the size read between chunks would lag behind and purge too much.
    """
    used = used_bytes(conn)
    if used <= max_bytes:
        return 0
    count = count_flows(conn)
    return min(count, int((used - max_bytes) / (used / count)) + 1) if count else 0


def purge_chunk(conn: sqlite3.Connection, older_than: float | None, keep_rows: int | None, oldest: int = 0) -> int:
    """Delete up to PURGE_CHUNK of the oldest flows that are past retention; returns how many went.

    Retention by age, by row count and by size (`oldest`: that many of the oldest flows, from
    size_surplus; the oldest go first whatever the reason); the index entries and
    the repeated parts only these flows used go with them.
    """
    boundaries = []
    if older_than is not None:
        row = conn.execute(
            "SELECT max(id) FROM (SELECT id FROM flows WHERE started_at < ? ORDER BY started_at LIMIT ?) AS oldest",
            (older_than, PURGE_CHUNK),
        ).fetchone()
        if row[0] is not None:
            boundaries.append(row[0])
    if keep_rows is not None:
        row = conn.execute("SELECT id FROM flows ORDER BY id DESC LIMIT 1 OFFSET ?", (keep_rows,)).fetchone()
        if row is not None:
            boundaries.append(row[0])
    if oldest > 0:
        row = conn.execute(
            "SELECT id FROM flows ORDER BY id LIMIT 1 OFFSET ?", (min(oldest, PURGE_CHUNK) - 1,)
        ).fetchone()
        if row is not None:
            boundaries.append(row[0])
    if not boundaries:
        return 0
    with conn:
        rows = conn.execute(
            "SELECT id, path, model, request_body, response_body, content, parts FROM flows"
            " WHERE id <= ? ORDER BY id LIMIT ?",
            (max(boundaries), PURGE_CHUNK),
        ).fetchall()
        if not rows:
            return 0
        forget_texts(conn, rows)
        conn.execute("DELETE FROM flows WHERE id >= ? AND id <= ?", (rows[0]["id"], rows[-1]["id"]))
        conn.execute("DELETE FROM flow_tags WHERE flow <= ?", (rows[-1]["id"],))
        conn.execute(
            "DELETE FROM attempts WHERE started_at < coalesce((SELECT min(started_at) FROM flows), ?)", (float("inf"),)
        )
    return len(rows)


def forget_texts(conn: sqlite3.Connection, rows: list[sqlite3.Row]) -> None:
    """Remove flows' index entries and their uses of repeated parts, before the rows are deleted.

    The index keeps no copy of the text, so removing a flow from it takes the text it was
    given: the packed row unpacked. Rows still in the layout before v8 are in the old index.
    """
    packed = [r for r in rows if r["content"] is not None]
    legacy = [r for r in rows if r["content"] is None]
    if pg.is_postgres(conn):
        conn.execute(f"DELETE FROM flows_fts WHERE id IN ({', '.join('?' * len(rows))})", [r["id"] for r in rows])
        blobs.release(conn, [ref[2] for r in packed for ref in packing.decode_refs(r["parts"])])
        return
    known: dict[int, str] = {}
    insert_many(
        conn,
        _DELETE_FTS,
        [
            ("delete", r["id"], r["path"], r["model"], plain["request_body"], plain["response_body"])
            for r in packed
            for plain in (unpack_row(conn, r, known),)
        ],
    )
    blobs.release(conn, [ref[2] for r in packed for ref in packing.decode_refs(r["parts"])])
    if legacy and _legacy_range(conn):
        insert_many(
            conn,
            f"INSERT INTO {LEGACY_FTS} ({LEGACY_FTS}, rowid, {', '.join(FTS_COLUMNS)})",
            [("delete", r["id"], r["path"], r["model"], r["request_body"], r["response_body"]) for r in legacy],
        )
