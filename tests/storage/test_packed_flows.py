"""Packed flows: readers see exactly what was captured, repeated parts are stored once and go
with their last flow, and search answers as the full-positional index of before v8 did."""

from __future__ import annotations

import json
import random
import sqlite3

import pytest

from core.records import FlowRecord
from storage import db, flows, packing, schema
from storage.flows import FlowFilter

T0 = 1_800_000_000.0
SYSTEM = "You are the support agent of Acme. " * 12  # an application's long prompt, in every request
TOOLS = [
    {"type": "function", "function": {"name": f"tool_{n}", "description": "Looks things up. " * 8}} for n in range(3)
]
WORDS = ("alpha", "bravo", "charlie", "café", "gpt-4o", "snake_case", "don't", "x--y")
# Near misses of a phrase's literal check: more letters on either side, other case, other
# separators, non-ASCII beside it (storage.flows._Phrases must leave these to the exact check).
NEAR = ("xgpt-4o", "gpt-4oo", "GPT-4O", "gpt\u20144o", "\u00e9gpt-4o", "gpt-4o\u00e9", "(gpt-4o)", "v1/models/x")


def chat_body(rng: random.Random, compact: bool) -> str:
    words = " ".join(rng.sample(WORDS, rng.randint(0, 3)) + rng.sample(NEAR, rng.randint(0, 2)))
    body = {
        "model": "gpt-4o",
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Hello {words} ünïcode"}],
    }
    if rng.random() < 0.5:
        body["tools"] = TOOLS
    separators = (",", ":") if compact else (", ", ": ")
    return json.dumps(body, separators=separators, ensure_ascii=rng.random() < 0.5)


def make_records(count: int, seed: int = 3) -> list[FlowRecord]:
    rng = random.Random(seed)
    records = []
    for n in range(count):
        kind = rng.choice(("chat", "chat", "chat", "models", "error", "empty"))
        status = {"error": 429, "empty": None}.get(kind, 200)
        method = "GET" if kind == "models" else "POST"
        request_body = chat_body(rng, compact=n % 2 == 0) if kind == "chat" else None
        if kind == "models":
            response_body = json.dumps({"object": "list", "data": [{"id": f"gpt-{i}"} for i in range(20)]})
        elif kind == "error":
            response_body = json.dumps({"error": {"message": "Rate limit reached for gpt-4o. " * 5}})
        elif kind == "chat":
            response_body = json.dumps({"choices": [{"message": {"content": f"Answer {n} {rng.choice(WORDS)}"}}]})
        else:
            response_body = None
        records.append(
            FlowRecord(
                flow_id=f"f{n}",
                started_at=T0 + n,
                method=method,
                path="/v1/models" if kind == "models" else "/v1/chat/completions",
                status=status,
                model=None if kind == "models" else rng.choice(("gpt-4o", "gpt-4o-mini")),
                stream=rng.random() < 0.3,
                request_headers=[["content-type", "application/json"], ["x-n", str(n)]],
                response_headers=[] if status is None else [["x-request-id", f"req_{n}"]],
                request_body=request_body,
                request_body_size=len((request_body or "").encode()),
                response_body=response_body,
                response_body_size=len((response_body or "").encode()),
                chunk_times=[[0.0, 10], [5.5, 20]] if n % 3 == 0 else None,
                error="Connection killed." if status is None else None,
            )
        )
    return records


def as_captured(record: FlowRecord) -> dict:
    """The texts a reader got before v8: the record as plain columns."""
    plain = dict(zip(flows.FLOW_COLUMNS, flows.column_values(record), strict=True))
    return {name: plain[name] for name in flows.PACKED_COLUMNS}


def reference_index(records: list[FlowRecord]) -> sqlite3.Connection:
    """The index before v8 (FTS5 with positions) over the same texts: what search must agree with."""
    conn = sqlite3.connect(":memory:")
    conn.execute(f"CREATE VIRTUAL TABLE ref USING fts5({', '.join(flows.FTS_COLUMNS)})")
    conn.executemany(
        "INSERT INTO ref (rowid, path, model, request_body, response_body) VALUES (?, ?, ?, ?, ?)",
        [(n, r.path, r.model, r.request_body, r.response_body) for n, r in enumerate(records, start=1)],
    )
    return conn


QUERIES = (
    "alpha",
    "bravo charlie",
    "gpt-4o",  # one word, two tokens: a phrase
    "GPT-4o-mini",
    "(gpt-4o)",
    "-gpt-4o.",
    "xgpt-4o",
    "gpt-4oo",
    "\u00e9gpt-4o",
    "4o gpt",  # both tokens, any order
    "cafe",  # diacritics folded, as FTS5's unicode61 does
    "CAFÉ",
    "don't",
    "snake_case",
    "x--y",
    "chat/completions",
    "v1/models",
    "--",  # no token at all
    "-- alpha",
    "acme support agent",  # only in the stored-once prompt
    "tool_1 alpha",
    "looks things",
    "unicode",
    "rate limit gpt-4o",
    'quote"inside',
    "absent",
)


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    path = tmp_path_factory.mktemp("packed") / "kr.db"
    db.ensure_database(path)
    conn = db.connect(path)
    records = make_records(400)
    packer = flows.FlowPacker()
    for start in range(0, len(records), 37):  # batches, as the writer makes them
        with conn:
            flows.insert_batch(conn, records[start : start + 37], packer)
    yield conn, records
    conn.close()


def expected_ids(reference: sqlite3.Connection, text: str, low: int = 1, high: int = 10**9) -> list[int]:
    query = flows.fts_query(text)
    found = reference.execute(
        "SELECT rowid FROM ref WHERE ref MATCH ? AND rowid BETWEEN ? AND ? ORDER BY rowid DESC", (query, low, high)
    )
    return [r[0] for r in found]


def test_every_reader_gets_the_texts_as_captured(stored):
    conn, records = stored
    for row_id, record in enumerate(records, start=1):
        row = flows.get_flow(conn, row_id)
        assert {name: row[name] for name in flows.PACKED_COLUMNS} == as_captured(record), row_id
        assert "content" not in row and "parts" not in row  # the JSON twin serialises every key
    exported = flows.search_flows(conn, FlowFilter(), 1000, columns="*")
    assert [r["request_body"] for r in exported] == [r.request_body for r in reversed(records)]


def test_repeated_prompts_tools_and_answers_are_stored_once(stored):
    conn, records = stored
    blobs = conn.execute("SELECT size, refs FROM blobs").fetchall()
    uses = sum(refs for _, refs in blobs)
    # The prompt in two JSON spellings, the tools in two, the model list, the error answer.
    assert len(blobs) <= 8 and uses > len(records)
    assert max(refs for _, refs in blobs) > 50
    packed = conn.execute("SELECT sum(length(content)) FROM flows").fetchone()[0]
    captured = sum(len(json.dumps(v or "")) for r in records for v in as_captured(r).values())
    assert packed < captured / 4


@pytest.mark.parametrize("text", QUERIES)
def test_search_finds_what_the_positional_index_found(stored, text, monkeypatch):
    conn, records = stored
    monkeypatch.setattr(flows, "CHECK_PAGE", 7)  # phrase checks over several rounds
    reference = reference_index(records)
    assert [r["id"] for r in flows.search_flows(conn, FlowFilter(q=text), 1000)] == expected_ids(reference, text)
    # Pages of five, as the UI walks them, give the same list.
    ids, before = [], None
    while True:
        page = [r["id"] for r in flows.search_flows(conn, FlowFilter(q=text), 5, before)]
        ids += page
        if len(page) < 5:
            break
        before = page[-1]
    assert ids == expected_ids(reference, text)


@pytest.mark.parametrize(
    "word", ["gpt-4o", "GPT-4o-mini", "(gpt-4o)", "/v1/models", "don't", "x--y", "caf\u00e9-au-lait"]
)
def test_a_phrase_found_literally_matches_exactly_what_a_full_index_matches(word):
    """The literal shortcut (storage.flows._Phrases) against FTS5 with positions, beside every kind of neighbour."""
    core = word.strip("()/")
    spellings = (core, core.upper(), core.replace("-", " "), core.replace("-", "\u2014"), core.replace("-", "--"))
    sides = ("", " ", "x", "7", "_", "-", "(", "\u00e9", "\u2014", "\u00a0", "\U0001f600")
    texts = [f"{left}{spelled}{right}" for spelled in spellings for left in sides for right in sides]
    rows = [(n, "/v1/chat/completions", None, text, None) for n, text in enumerate(texts, start=1)]
    phrases = flows._index_query(word)[1]
    exact = flows._tokenizer.matching(rows, phrases.query)
    assert phrases.matching(rows) == exact
    assert 0 < len(exact) < len(rows)


@pytest.mark.parametrize(
    "text", ["gpt-4o", "gpt-mini", "4o-gpt", "GPT-4o-mini rate", "aa-b", "a-- b-a", "x--y 7", "gpt-4o --", "a.b.c-d"]
)
def test_the_check_of_ascii_candidates_matches_exactly_what_a_full_index_matches(text):
    """Candidates whose texts are all ASCII are decided without an index: random texts of the query's own tokens."""
    rng = random.Random(text)
    tokens = [t for term in text.split() for t in flows._tokenizer.tokens(term)] + ["aaa", "gpt4o", "z"]
    separators = (" ", "-", "--", "_", "/", ". ", '","', "", "\n")

    def ascii_text() -> str:
        words = [rng.choice((t, t.upper(), t.capitalize())) for t in rng.choices(tokens, k=rng.randint(0, 8))]
        return "".join(w + rng.choice(separators) for w in words).strip()

    rows = [(n, ascii_text(), ascii_text() or None, ascii_text(), ascii_text()) for n in range(1, 3001)]
    phrases = flows._index_query(text)[1]
    exact = flows._tokenizer.matching(rows, phrases.query)
    assert phrases.matching(rows) == exact
    assert 0 < len(exact) < len(rows)


@pytest.mark.parametrize("text", ["gpt-4o", "gpt-alpha", "4o-gpt", "rate limit gpt-4o"])
def test_pages_that_stop_at_their_budget_of_phrase_checks_still_find_every_match(stored, text, monkeypatch):
    conn, records = stored
    monkeypatch.setattr(flows, "CHECK_PAGE", 7)
    monkeypatch.setattr(flows, "PHRASE_CHECK_BUDGET", 20)
    ids, before, stopped = [], None, 0
    while True:
        page = flows.search_page(conn, FlowFilter(q=text), 5, before)
        ids += [r["id"] for r in page.rows]
        assert all(r["id"] < before for r in page.rows) if before else True
        if page.checked_down_to is not None:
            stopped += 1
            assert len(page.rows) < 5 and all(r["id"] >= page.checked_down_to for r in page.rows)
            before = page.checked_down_to
        elif len(page.rows) == 5:
            before = page.rows[-1]["id"]
        else:
            break
    assert ids == expected_ids(reference_index(records), text)
    if text in ("gpt-alpha", "4o-gpt"):  # common words, seldom side by side: pages stop at the budget
        assert stopped


@pytest.mark.parametrize("text", ["gpt-4o", "gpt-alpha", "4o-gpt"])
def test_phrase_pages_stop_at_the_same_flows_on_postgresql(tmp_path, postgres_url, monkeypatch, text):
    """Candidates over several rounds and past the budget: the same pages, and the same "checked down to"."""
    monkeypatch.setattr(flows, "CHECK_PAGE", 7)
    monkeypatch.setattr(flows, "PHRASE_CHECK_BUDGET", 20)
    records = make_records(300)

    def pages(url: str | None) -> list[tuple[list[int], int | None]]:
        db.use_postgres(url)
        try:
            path = tmp_path / ("postgresql" if url else "sqlite") / "kr.db"
            path.parent.mkdir()
            db.ensure_database(path)
            conn = db.connect(path)
            for start in range(0, len(records), 37):
                with conn:
                    flows.insert_batch(conn, records[start : start + 37], flows.FlowPacker())
            seen, before = [], None
            while True:
                page = flows.search_page(conn, FlowFilter(q=text), 5, before)
                seen.append(([r["id"] for r in page.rows], page.checked_down_to))
                if page.checked_down_to is not None:
                    before = page.checked_down_to
                elif len(page.rows) == 5:
                    before = page.rows[-1]["id"]
                else:
                    break
            conn.close()
            return seen
        finally:
            db.use_postgres(None)

    on_sqlite = pages(None)
    assert pages(postgres_url) == on_sqlite
    assert any(stop is not None for _, stop in on_sqlite) == (text != "gpt-4o")


def test_search_with_filters_and_a_phrase(stored):
    conn, records = stored
    reference = reference_index(records)
    expected = [i for i in expected_ids(reference, "gpt-4o alpha") if records[i - 1].model == "gpt-4o-mini"]
    found = flows.search_flows(conn, FlowFilter(q="gpt-4o alpha", model="gpt-4o-mini"), 1000)
    assert [r["id"] for r in found] == expected and expected


def old_database(path) -> sqlite3.Connection:
    """A database at the schema before packing, with the fixture's flows inserted as that version did."""
    import tests.conftest as conftest

    before = schema.MIGRATIONS[: schema.MIGRATIONS.index(schema._v11_packed_flows)]
    real = schema.MIGRATIONS
    schema.MIGRATIONS = before
    try:
        db.ensure_database(path)
    finally:
        schema.MIGRATIONS = real
    conn = db.connect(path)
    with conn:
        conftest.insert_into_old_schema(conn, make_records(300, seed=5))
    return conn


def snapshot(conn: sqlite3.Connection) -> tuple:
    """Everything a reader sees: each flow's texts, and each query's results."""
    rows = [{k: r[k] for k in flows.PACKED_COLUMNS} for r in flows.search_flows(conn, FlowFilter(), 1000, columns="*")]
    searches = [[r["id"] for r in flows.search_flows(conn, FlowFilter(q=q), 1000)] for q in QUERIES]
    return rows, searches


def test_an_old_database_converts_in_chunks_and_reads_the_same_at_every_step(tmp_path, monkeypatch):
    path = tmp_path / "old.db"
    conn = old_database(path)
    before = schema.MIGRATIONS.index(schema._v11_packed_flows)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == before
    old_texts = [dict(r) for r in conn.execute(f"SELECT {', '.join(flows.PACKED_COLUMNS)} FROM flows ORDER BY id")]
    schema.migrate(conn)  # quick: marks the old rows, converts none
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(schema.MIGRATIONS)
    from storage import conversion

    assert conversion.progress(conn).remaining == 300
    expected = snapshot(conn)
    assert [{k: r[k] for k in flows.PACKED_COLUMNS} for r in reversed(expected[0])] == old_texts
    # New flows arrive while old ones wait: both are read and searched.
    with conn:
        flows.insert_batch(conn, make_records(20, seed=9))
    expected = snapshot(conn)
    packer = flows.FlowPacker()
    steps = 0
    while conversion.progress(conn).remaining:
        assert conversion.convert_chunk(conn, packer, chunk=45)
        steps += 1
        if steps == 3:  # stopped here and started again, by another process
            conn.close()
            conn = db.connect(path)
            packer = flows.FlowPacker()
        assert snapshot(conn) == expected, steps
    assert steps == 7
    while conversion.convert_chunk(conn, packer):  # the old index goes, a chunk at a time
        pass
    assert not conversion.pending(conn)
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    assert flows.LEGACY_FTS not in names and "flows_legacy" not in names
    assert conn.execute("SELECT count(*) FROM flows WHERE content IS NULL").fetchone()[0] == 0
    assert snapshot(conn) == expected
    conn.close()


def test_purging_flows_removes_their_index_entries_and_last_uses_of_parts(tmp_path):
    path = tmp_path / "kr.db"
    db.ensure_database(path)
    conn = db.connect(path)
    records = make_records(120)
    with conn:
        flows.insert_batch(conn, records)
    while flows.purge_chunk(conn, None, keep_rows=10):
        pass
    kept = records[-10:]
    assert [r["flow_id"] for r in flows.recent_flows(conn, 50)] == [r.flow_id for r in reversed(kept)]
    reference = reference_index(records)
    for text in QUERIES:
        assert [r["id"] for r in flows.search_flows(conn, FlowFilter(q=text), 1000)] == expected_ids(
            reference, text, low=111
        ), text
    used = {ref[2] for r in conn.execute("SELECT parts FROM flows") for ref in packing.decode_refs(r[0])}
    blobs = dict(conn.execute("SELECT id, refs FROM blobs").fetchall())
    assert set(blobs) == used  # nothing orphaned, nothing missing
    while flows.purge_chunk(conn, None, keep_rows=0):
        pass
    assert conn.execute("SELECT count(*) FROM blobs").fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM flows_fts").fetchone()[0] == 0
    conn.close()
