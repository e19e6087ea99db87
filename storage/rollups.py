"""Per-minute and per-hour rollups, kept by the capture writer as it inserts the flows.

The dashboard and /metrics read only these tables, never the flows table. Each grain
keeps a row per bucket and *dimension value*: the hour grain has one row for all flows
("all"), one per model, upstream key, client key, upstream and group, so a day's
breakdown by key reads 24 rows a key however many models and clients mixed in, and all
time reads one row an hour. The minute grain keeps "all" only (the charts and the short
windows). Latencies are histograms over fixed buckets, so percentiles of any window are
sums of columns.
"""

from __future__ import annotations

import sqlite3
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from core.records import FlowRecord
from storage.sql import insert_many

# Upper bounds, in ms, of the latency buckets; the last bucket takes everything above.
BUCKETS_MS = (
    5,
    10,
    20,
    35,
    50,
    75,
    100,
    150,
    200,
    300,
    500,
    750,
    1000,
    1500,
    2000,
    3000,
    5000,
    7500,
    10_000,
    15_000,
    20_000,
    30_000,
    60_000,
    120_000,
)
HISTOGRAM_SIZE = len(BUCKETS_MS) + 1
GRAINS = {"minute": 60, "hour": 3600}
KEEP_MINUTES_SECONDS = 2 * 86400  # minute rows older than this are dropped; hours stay

COUNTERS = ("requests", "errors", "streamed", "prompt_tokens", "completion_tokens", "cost", "duration_ms")
LATENCY = tuple(f"lat{i}" for i in range(HISTOGRAM_SIZE))
FIRST_BYTE = tuple(f"ttfb{i}" for i in range(HISTOGRAM_SIZE))  # streamed responses only
VALUES = COUNTERS + LATENCY + FIRST_BYTE

ALL = "all"
# Flow columns a window can be broken down by. The upstream and group ones came with many
# upstreams (schema v7): flows stored before have no rows for them.
BREAKDOWNS = ("model", "upstream_key_id", "client_key_id", "upstream_id", "group_id")
DIMENSIONS_OF = {"minute": (ALL,), "hour": (ALL, *BREAKDOWNS)}
# Dimension first: every read is one dimension over a range of buckets, all time reads
# only the "all" rows. value: "" for "all" and for flows without one (no model, no key).
KEY = ("dimension", "bucket", "value")


def table_of(grain: str) -> str:
    return f"rollups_{grain}"


def bucket_index(ms: float) -> int:
    for index, bound in enumerate(BUCKETS_MS):
        if ms <= bound:
            return index
    return len(BUCKETS_MS)


def add_record_values(entry: list, record: FlowRecord) -> None:
    """Add one flow to a VALUES-long list of sums."""
    entry[0] += 1
    entry[1] += record.is_error
    entry[2] += bool(record.stream)
    entry[3] += record.prompt_tokens or 0
    entry[4] += record.completion_tokens or 0
    entry[5] += record.cost or 0
    entry[6] += record.duration_ms or 0
    if record.duration_ms is not None:
        entry[len(COUNTERS) + bucket_index(record.duration_ms)] += 1
    if record.stream and record.first_byte_at and record.started_at:
        ttfb = (record.first_byte_at - record.started_at) * 1000
        entry[len(COUNTERS) + HISTOGRAM_SIZE + bucket_index(ttfb)] += 1


def aggregate(records: Iterable[FlowRecord], grain: str) -> dict[tuple, list[float]]:
    """Sum a batch of flows by (dimension, bucket, value) for every dimension of `grain`."""
    seconds, dimensions = GRAINS[grain], DIMENSIONS_OF[grain]
    sums: dict[tuple, list[float]] = defaultdict(lambda: [0] * len(VALUES))
    for record in records:
        bucket = int(record.started_at // seconds) * seconds
        for dimension in dimensions:
            value = "" if dimension == ALL else str(getattr(record, dimension) or "")
            add_record_values(sums[(dimension, bucket, value)], record)
    return sums


def create_tables(db) -> None:
    """The rollup tables in this module's layout (for the migration that introduces it)."""
    columns: dict = {"bucket": int, "dimension": str, "value": str}
    columns |= {c: (float if c in ("cost", "duration_ms") else int) for c in VALUES}
    for grain in GRAINS:
        db[table_of(grain)].create(columns, pk=KEY, defaults={c: 0 for c in VALUES})


_UPSERT_HEAD = {grain: f"INSERT INTO {table_of(grain)} ({', '.join(KEY + VALUES)})" for grain in GRAINS}
_UPSERT_TAIL = f"ON CONFLICT ({', '.join(KEY)}) DO UPDATE SET " + ", ".join(f"{c} = {c} + excluded.{c}" for c in VALUES)


def add_records(conn: sqlite3.Connection, records: list[FlowRecord]) -> None:
    """Fold a batch of new flows into both grains, in the caller's transaction."""
    if not records:
        return
    for grain in GRAINS:
        rows = [(*key, *values) for key, values in aggregate(records, grain).items()]
        insert_many(conn, _UPSERT_HEAD[grain], rows, _UPSERT_TAIL)


def drop_old_minutes(conn: sqlite3.Connection, now: float) -> None:
    conn.execute(f"DELETE FROM {table_of('minute')} WHERE bucket < ?", (now - KEEP_MINUTES_SECONDS,))  # a small table


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
        requests=int(counters[0]),
        errors=int(counters[1]),
        streamed=int(counters[2]),
        prompt_tokens=int(counters[3]),
        completion_tokens=int(counters[4]),
        cost=float(counters[5]),
        duration_ms=float(counters[6]),
        latency=list(values[len(COUNTERS) : len(COUNTERS) + HISTOGRAM_SIZE]),
        first_byte=list(values[len(COUNTERS) + HISTOGRAM_SIZE :]),
    )


def _window(dimension: str, since: float | None, until: float | None = None) -> tuple[str, tuple]:
    where = "WHERE dimension = ?"
    params: list[str | float] = [dimension]
    if since is not None:
        where += " AND bucket >= ?"
        params.append(since)
    if until is not None:
        where += " AND bucket < ?"
        params.append(until)
    return where, tuple(params)


def totals(conn: sqlite3.Connection, grain: str, since: float | None, until: float | None = None) -> Totals:
    """Everything since `since` (a bucket boundary or None for all time), before `until` if given."""
    where, params = _window(ALL, since, until)
    row = conn.execute(f"SELECT {_SUMS} FROM {table_of(grain)} {where}", params).fetchone()
    return _totals(tuple(row))


def breakdown(
    conn: sqlite3.Connection, since: float | None, dimension: str, limit: int | None = 20, until: float | None = None
) -> list[tuple[str | int | None, Totals]]:
    """Hourly totals since `since` per model, upstream key, client key, upstream or group, busiest first.

    Keys, upstreams and groups come back as ids, and flows without one as None.
    """
    if dimension not in BREAKDOWNS:
        raise ValueError(dimension)
    where, params = _window(dimension, since, until)
    rows = conn.execute(
        f"SELECT value, {_SUMS} FROM {table_of('hour')} {where} GROUP BY value ORDER BY sum(requests) DESC LIMIT ?",
        (*params, 2**63 - 1 if limit is None else limit),
    ).fetchall()
    return [(_dimension_value(dimension, row[0]), _totals(tuple(row[1:]))) for row in rows]


def _dimension_value(dimension: str, value: str) -> str | int | None:
    if not value:
        return None
    return value if dimension == "model" else int(value)


def series(conn: sqlite3.Connection, grain: str, since: float) -> list[tuple[int, int, int]]:
    """(bucket, requests, errors) per bucket since `since`, oldest first; empty buckets omitted."""
    return [
        tuple(r)
        for r in conn.execute(
            f"SELECT bucket, sum(requests), sum(errors) FROM {table_of(grain)} WHERE dimension = ? AND bucket >= ?"
            " GROUP BY bucket ORDER BY bucket LIMIT 10000",
            (ALL, since),
        )
    ]


def series_totals(
    conn: sqlite3.Connection, grain: str, since: float, until: float | None = None, step: int | None = None
) -> list[tuple[int, Totals]]:
    """Every figure per bucket since `since`, oldest first; empty buckets omitted (latency and token charts).

    `step` sums the grain's rows into coarser buckets (86400: days of hour rows); latency
    histograms add up, so percentiles of a day are exact to the bucket bounds.
    """
    bucket = "bucket" if step is None else f"(bucket - bucket % {int(step)})"
    rows = conn.execute(
        f"SELECT {bucket} AS b, {_SUMS} FROM {table_of(grain)} WHERE dimension = ? AND bucket >= ? AND bucket < ?"
        " GROUP BY b ORDER BY b LIMIT 10000",
        (ALL, since, float("inf") if until is None else until),
    )
    return [(row[0], _totals(tuple(row[1:]))) for row in rows]


def spend_per_day(
    conn: sqlite3.Connection, dimension: str, since: float, until: float | None = None
) -> dict[str | int | None, dict[int, tuple[float, int]]]:
    """(cost, requests) per UTC day in [since, until) of every value of `dimension` (ALL: one, None).

    Read from hour rows through their (dimension, bucket, value, requests, cost) index, not the wide rows.
    """
    if dimension != ALL and dimension not in BREAKDOWNS:
        raise ValueError(dimension)
    rows = conn.execute(
        f"SELECT value, bucket - bucket % 86400 AS day, sum(cost), sum(requests) FROM {table_of('hour')}"
        " WHERE dimension = ? AND bucket >= ? AND bucket < ? GROUP BY value, day LIMIT 1000000",
        (dimension, since, float("inf") if until is None else until),
    ).fetchall()
    days: dict[str | int | None, dict[int, tuple[float, int]]] = defaultdict(dict)
    for value, day, cost, requests in rows:
        key = None if dimension == ALL else _dimension_value(dimension, value)
        days[key][int(day)] = (float(cost or 0), int(requests or 0))
    return days
