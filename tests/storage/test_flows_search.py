"""search_flows against a plain Python filter over the same rows: every filter, every page.

Rows are written in the order their flows ended, so ids and start times disagree here and
there, as they do in a real capture; a time range must still return exactly its rows.
"""

from __future__ import annotations

import random
import re
from dataclasses import replace

import pytest

from core.records import FlowRecord
from storage import db, flows, pg
from storage.flows import FlowFilter

T0 = 1_800_000_000.0
WORDS = ("alpha", "bravo", "charlie", "delta")
MODELS = ("gpt-4o", "gpt-4o-mini", "o3-mini", None)
STATUSES = (200, 200, 200, 201, 400, 429, 500, 503, None)
COUNT = 600


def make_rows(seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for n in range(COUNT):
        started = T0 + n * 10 + rng.uniform(0, 60)  # overlapping flows: ids only roughly follow start times
        words = " ".join(rng.sample(WORDS, rng.randint(0, 2)))
        status = rng.choice(STATUSES)
        rows.append(
            {
                "flow_id": f"f{n}",
                "started_at": started,
                "ended_at": started + rng.uniform(0.01, 90),
                "method": "POST",
                "path": rng.choice(("/v1/chat/completions", "/v1/embeddings")),
                "status": status,
                "error": "Connection killed." if status is None else None,
                "model": rng.choice(MODELS),
                "stream": rng.random() < 0.3,
                "client_key_id": rng.choice((1, 2, None)),
                "upstream_key_id": rng.choice((1, 2, 3, None)),
                "request_body": f'{{"messages": "{words}"}}',
                "response_body": "{}",
            }
        )
    rows.sort(key=lambda r: r["ended_at"])  # the writer stores flows as they end
    return rows


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def seeded(request, tmp_path_factory):
    if request.param == "postgresql":
        url = request.getfixturevalue("postgres_server").database("search")
        db.ensure_database(url)
        conn = db.connect(url)
    else:
        path = tmp_path_factory.mktemp("search") / "kr.db"
        db.ensure_database(path)
        conn = db.connect(path)
    rows = make_rows(7)
    with conn:
        flows.insert_batch(conn, [FlowRecord(**r) for r in rows])
    for row_id, row in enumerate(rows, start=1):
        row["id"] = row_id
    yield conn, rows
    conn.close()


def matches(row: dict, f: FlowFilter) -> bool:
    status = row["status"]
    if f.status == "error" and status is not None:
        return False
    if f.status in flows.STATUS_CLASSES:
        low, high = flows.STATUS_CLASSES[f.status]
        if status is None or not low <= status < high:
            return False
    if f.model is not None and row["model"] != f.model:
        return False
    if f.client_key_id is not None and row["client_key_id"] != f.client_key_id:
        return False
    if f.upstream_key_id is not None and row["upstream_key_id"] != f.upstream_key_id:
        return False
    if f.path is not None and not row["path"].startswith(f.path):
        return False
    if f.stream is not None and row["stream"] != f.stream:
        return False
    if f.since is not None and row["started_at"] < f.since:
        return False
    if f.until is not None and row["started_at"] >= f.until:
        return False
    if f.after_id is not None and row["id"] <= f.after_id:
        return False
    if f.q:
        # FTS5's reading: each word's tokens, one after the other within one column (a phrase).
        columns = [re.findall(r"[a-z0-9]+", str(row[c] or "").lower()) for c in ("path", "model", "request_body")]
        return all(
            any(holds(tokens, re.findall(r"[a-z0-9]+", word.lower())) for tokens in columns) for word in f.q.split()
        )
    return True


def holds(tokens: list[str], phrase: list[str]) -> bool:
    return any(tokens[i : i + len(phrase)] == phrase for i in range(len(tokens) - len(phrase) + 1))


def random_filter(rng: random.Random) -> FlowFilter:
    span = COUNT * 10
    since = T0 + rng.uniform(0, span) if rng.random() < 0.6 else None
    until = (since or T0) + rng.uniform(0, span / 4) if rng.random() < 0.6 else None
    return FlowFilter(
        q=rng.choice((None, None, "alpha", "bravo charlie", "gpt-4o", "4o-MINI", "chat/completions alpha")),
        status=rng.choice((None, None, "2xx", "4xx", "5xx", "error")),
        model=rng.choice((None, None, *[m for m in MODELS if m])),
        client_key_id=rng.choice((None, None, 1, 2)),
        upstream_key_id=rng.choice((None, None, 1, 3)),
        path=rng.choice((None, None, "/v1/emb")),
        stream=rng.choice((None, None, True, False)),
        since=since,
        until=until,
        after_id=rng.choice((None, None, None, rng.randint(0, COUNT))),
    )


def every_page(conn, f: FlowFilter, limit: int) -> list[int]:
    ids, before = [], None
    while True:
        page = [r["id"] for r in flows.search_flows(conn, f, limit, before)]
        ids += page
        if len(page) < limit:
            return ids
        before = page[-1]


@pytest.mark.parametrize("narrow_rows", [0, flows.NARROW_RANGE_ROWS], ids=["range-as-condition", "range-as-ids"])
def test_every_filter_and_page_returns_exactly_the_matching_flows_newest_first(seeded, monkeypatch, narrow_rows):
    conn, rows = seeded
    monkeypatch.setattr(flows, "NARROW_RANGE_ROWS", narrow_rows)
    rng = random.Random(narrow_rows)
    for _ in range(150):
        f = random_filter(rng)
        expected = sorted((r["id"] for r in rows if matches(r, f)), reverse=True)
        assert every_page(conn, f, rng.choice((7, 50))) == expected, f


@pytest.mark.parametrize("gin_in_plan", [True, False], ids=["matches-from-gin-first", "walk-first"])
def test_postgresql_finds_the_same_flows_whether_it_asks_the_gin_index_first_or_walks(seeded, monkeypatch, gin_in_plan):
    conn, rows = seeded
    if not pg.is_postgres(conn):
        pytest.skip("PostgreSQL's choice between its GIN index and the walk")
    # Whether EXPLAIN names the GIN index decides it; a table this small is read whole either way.
    monkeypatch.setattr(flows, "_GIN_INDEX", "" if gin_in_plan else "an index no plan names")
    rng = random.Random(11)
    for _ in range(100):
        f = random_filter(rng)
        f = replace(f, q=f.q or rng.choice(("alpha", "gpt-4o", "4o-MINI", "delta charlie", "absent")))
        expected = sorted((r["id"] for r in rows if matches(r, f)), reverse=True)
        assert every_page(conn, f, rng.choice((7, 50))) == expected, f


def test_a_time_range_holding_no_flow_returns_none(seeded):
    conn, _ = seeded
    assert flows.search_flows(conn, FlowFilter(since=T0 - 100, until=T0 - 50)) == []
    assert flows.search_flows(conn, FlowFilter(since=T0 + 500, until=T0 + 400)) == []
    assert flows.search_flows(conn, FlowFilter(), before_id=1) == []
