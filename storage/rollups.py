"""Per-minute and per-hour rollups of the flows, kept by the capture writer as it inserts them.

The dashboard reads only these tables, never the flows table, so it costs the same at
a million flows as at ten. Latencies are kept as histograms over fixed buckets, so
percentiles of any window are sums of columns.
"""

from __future__ import annotations

import sqlite3
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

# Upper bounds, in ms, of the latency buckets; the last bucket takes everything above.
BUCKETS_MS = (5, 10, 20, 35, 50, 75, 100, 150, 200, 300, 500, 750, 1000, 1500, 2000, 3000, 5000, 7500, 10_000,
              15_000, 20_000, 30_000, 60_000, 120_000)  # fmt: skip
HISTOGRAM_SIZE = len(BUCKETS_MS) + 1
GRAINS = {"minute": 60, "hour": 3600}
KEEP_MINUTES_SECONDS = 2 * 86400  # minute rows older than this are dropped; hours stay

COUNTERS = ("requests", "errors", "streamed", "prompt_tokens", "completion_tokens", "cost", "duration_ms")
LATENCY = tuple(f"lat{i}" for i in range(HISTOGRAM_SIZE))
FIRST_BYTE = tuple(f"ttfb{i}" for i in range(HISTOGRAM_SIZE))  # streamed responses only
DIMENSIONS = ("bucket", "model", "upstream_key_id", "client_key_id")
VALUES = COUNTERS + LATENCY + FIRST_BYTE


def table_of(grain: str) -> str:
    return f"rollups_{grain}"


def bucket_index(ms: float) -> int:
    for index, bound in enumerate(BUCKETS_MS):
        if ms <= bound:
            return index
    return len(BUCKETS_MS)


def is_error(row: dict[str, Any]) -> bool:
    return row.get("status") is None or row["status"] >= 400 or bool(row.get("error"))


def aggregate(rows: Iterable[dict[str, Any]], seconds: int) -> dict[tuple, list[float]]:
    """Sum a batch of flow rows by (bucket, model, upstream key, client key)."""
    sums: dict[tuple, list[float]] = defaultdict(lambda: [0] * len(VALUES))
    for row in rows:
        bucket = int(row["started_at"] // seconds) * seconds
        # "" and 0 stand for "none": NULLs would defeat the UPSERT's conflict target.
        key = (bucket, row.get("model") or "", row.get("upstream_key_id") or 0, row.get("client_key_id") or 0)
        entry = sums[key]
        entry[0] += 1
        entry[1] += is_error(row)
        entry[2] += bool(row.get("stream"))
        entry[3] += row.get("prompt_tokens") or 0
        entry[4] += row.get("completion_tokens") or 0
        entry[5] += row.get("cost") or 0
        entry[6] += row.get("duration_ms") or 0
        if row.get("duration_ms") is not None:
            entry[len(COUNTERS) + bucket_index(row["duration_ms"])] += 1
        if row.get("stream") and row.get("first_byte_at") and row.get("started_at"):
            ttfb = (row["first_byte_at"] - row["started_at"]) * 1000
            entry[len(COUNTERS) + HISTOGRAM_SIZE + bucket_index(ttfb)] += 1
    return sums


def _upsert_sql(table: str) -> str:
    columns = DIMENSIONS + VALUES
    updates = ", ".join(f"{c} = {c} + excluded.{c}" for c in VALUES)
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
        f" ON CONFLICT ({', '.join(DIMENSIONS)}) DO UPDATE SET {updates}"
    )


_UPSERTS = {grain: _upsert_sql(table_of(grain)) for grain in GRAINS}


def add_rows(conn: sqlite3.Connection, rows: list[dict[str, Any]]) -> None:
    """Fold a batch of new flow rows into both grains, in the caller's transaction."""
    if not rows:
        return
    for grain, seconds in GRAINS.items():
        conn.executemany(_UPSERTS[grain], [(*key, *values) for key, values in aggregate(rows, seconds).items()])


def drop_old_minutes(conn: sqlite3.Connection, now: float) -> None:
    conn.execute(f"DELETE FROM {table_of('minute')} WHERE bucket < ?", (now - KEEP_MINUTES_SECONDS,))


# --------------------------------------------------------------------------- reading


@dataclass
class Totals:
    requests: int
    errors: int
    streamed: int
    prompt_tokens: int
    completion_tokens: int
    cost: float
    duration_ms: float
    latency: list[int]
    first_byte: list[int]

    @property
    def success_rate(self) -> float | None:
        return None if not self.requests else (self.requests - self.errors) / self.requests

    def latency_ms(self, pct: float) -> float | None:
        return percentile(self.latency, pct)

    def first_byte_ms(self, pct: float) -> float | None:
        return percentile(self.first_byte, pct)


def percentile(histogram: list[int], pct: float) -> float | None:
    """The bucket bound at which `pct` % of the counted values lie (an upper estimate)."""
    total = sum(histogram)
    if not total:
        return None
    rank = total * pct / 100
    seen = 0
    for index, count in enumerate(histogram):
        seen += count
        if seen >= rank:
            return float(BUCKETS_MS[index]) if index < len(BUCKETS_MS) else float("inf")
    return float("inf")


_SUMS = ", ".join(f"coalesce(sum({c}), 0)" for c in VALUES)


def _totals(values: tuple) -> Totals:
    counters = values[: len(COUNTERS)]
    return Totals(
        requests=int(counters[0]), errors=int(counters[1]), streamed=int(counters[2]),
        prompt_tokens=int(counters[3]), completion_tokens=int(counters[4]), cost=float(counters[5]),
        duration_ms=float(counters[6]),
        latency=list(values[len(COUNTERS): len(COUNTERS) + HISTOGRAM_SIZE]),
        first_byte=list(values[len(COUNTERS) + HISTOGRAM_SIZE:]),
    )  # fmt: skip


def totals(conn: sqlite3.Connection, grain: str, since: float | None) -> Totals:
    """Everything since `since` (a bucket boundary or None for all time)."""
    where, params = ("WHERE bucket >= ?", (since,)) if since is not None else ("", ())
    row = conn.execute(f"SELECT {_SUMS} FROM {table_of(grain)} {where}", params).fetchone()
    return _totals(tuple(row))


def breakdown(conn: sqlite3.Connection, grain: str, since: float | None, dimension: str, limit: int = 20) -> list:
    """Totals per model, upstream key or client key, busiest first."""
    if dimension not in ("model", "upstream_key_id", "client_key_id"):
        raise ValueError(dimension)
    where, params = ("WHERE bucket >= ?", (since,)) if since is not None else ("", ())
    rows = conn.execute(
        f"SELECT {dimension}, {_SUMS} FROM {table_of(grain)} {where} GROUP BY {dimension}"
        f" ORDER BY sum(requests) DESC LIMIT ?",
        (*params, limit),
    ).fetchall()
    return [(row[0], _totals(tuple(row[1:]))) for row in rows]


def by_labels(conn: sqlite3.Connection) -> list[tuple[str, int, int, Totals]]:
    """All-time totals per (model, upstream key, client key), for /metrics."""
    rows = conn.execute(
        f"SELECT model, upstream_key_id, client_key_id, {_SUMS} FROM {table_of('hour')}"
        " GROUP BY model, upstream_key_id, client_key_id LIMIT 100000"
    ).fetchall()
    return [(row[0], row[1], row[2], _totals(tuple(row[3:]))) for row in rows]


def series(conn: sqlite3.Connection, grain: str, since: float) -> list[tuple[int, int, int]]:
    """(bucket, requests, errors) per bucket since `since`, oldest first; empty buckets omitted."""
    return [
        tuple(r)
        for r in conn.execute(
            f"SELECT bucket, sum(requests), sum(errors) FROM {table_of(grain)} WHERE bucket >= ?"
            " GROUP BY bucket ORDER BY bucket LIMIT 10000",
            (since,),
        )
    ]
