"""What the captured flows cost on disk, by part, and what retention would keep at the current rate.

Reads every page once (SQLite's dbstat table) and the flows table once: seconds at a
million flows, for `run.py storage stats`, never for a page of the UI.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from storage import conversion, flows, pg

DAY = 86400.0
GB = 10**9  # capture.max_gb is in decimal gigabytes, as disks are sold


@dataclass(frozen=True)
class StorageStats:
    flows: int
    oldest_at: float | None
    newest_at: float | None
    file_bytes: int  # the database file and its write-ahead log
    used_bytes: int  # pages in use; the rest are free pages that new rows fill first
    rows_bytes: int  # the flows table without its packed texts, its indexes, attempts
    bodies_bytes: int  # packed headers and bodies, old-layout texts not converted yet, blobs
    index_bytes: int  # the full-text index (and the old one while flows are converted)
    other_bytes: int  # rollups, keys, clients, routes
    captured_body_bytes: int  # the bodies' sizes as captured, before compression
    blobs: int  # repeated parts stored once
    dedup_saved_bytes: int  # what storing each part once saved, compressed
    dedup_saved_raw_bytes: int  # the same, as captured
    flows_last_day: int
    not_converted: int  # flows still in the layout before schema v8

    def per_flow(self, part_bytes: int) -> float:
        return part_bytes / self.flows if self.flows else 0.0


@dataclass(frozen=True)
class RetentionOutlook:
    flows_per_day: float
    keep_days: int
    max_rows: int
    max_gb: float
    kept_flows: int  # what the limits together would keep, at this rate and this size per flow
    kept_bytes: int
    limited_by: str  # "keep_days", "max_rows", "max_gb" or "nothing"


def _page_bytes(conn: sqlite3.Connection) -> dict[str, int]:
    if pg.is_postgres(conn):  # each table (with its TOAST table, where long values go) and index
        return dict(
            conn.execute(
                "SELECT c.relname,"
                " pg_relation_size(c.oid) + coalesce(pg_total_relation_size(nullif(c.reltoastrelid, 0)), 0)"
                " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'i')"
            )
        )
    try:
        return dict(conn.execute("SELECT name, sum(pgsize) FROM dbstat GROUP BY name"))
    except sqlite3.OperationalError:  # an SQLite built without dbstat: totals only
        return {}


def collect(conn: sqlite3.Connection, db_path: Path, now: float | None = None) -> StorageStats:
    now = time.time() if now is None else now
    count, oldest, newest = conn.execute("SELECT count(*), min(started_at), max(started_at) FROM flows").fetchone()
    plain = " + ".join(f"coalesce(length({c}), 0)" for c in flows.PACKED_COLUMNS)
    packed, captured = conn.execute(
        f"SELECT coalesce(sum(coalesce(length(content), 0) + coalesce(length(parts), 0) + {plain}), 0),"
        " coalesce(sum(coalesce(request_body_size, 0) + coalesce(response_body_size, 0)), 0) FROM flows"
    ).fetchone()
    blob_count, saved, saved_raw = conn.execute(
        "SELECT count(*), coalesce(sum(length(data) * (refs - 1)), 0), coalesce(sum(size * (refs - 1)), 0) FROM blobs"
    ).fetchone()
    pages = _page_bytes(conn)
    by_part = {"rows": 0, "bodies": 0, "index": 0, "other": 0}
    for name, size in pages.items():
        if name.startswith("flows_fts"):
            by_part["index"] += size
        elif name == "blobs" or name.startswith("sqlite_autoindex_blobs") or name.startswith("idx_blobs"):
            by_part["bodies"] += size
        elif name in ("flows", "attempts") or name.startswith(("idx_flows", "idx_attempts")):
            by_part["rows"] += size
        else:
            by_part["other"] += size
    if pages:  # the packed texts live in the flows table's pages: counted as bodies, not rows
        moved = min(packed, by_part["rows"])
        by_part["rows"] -= moved
        by_part["bodies"] += moved
    if pg.is_postgres(conn):
        file_bytes = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
    else:
        file_bytes = sum(p.stat().st_size for p in (db_path, Path(f"{db_path}-wal")) if p.exists())
    last_day = conn.execute("SELECT count(*) FROM flows WHERE started_at >= ?", (now - DAY,)).fetchone()[0]
    return StorageStats(
        flows=count,
        oldest_at=oldest,
        newest_at=newest,
        file_bytes=file_bytes,
        used_bytes=flows.used_bytes(conn),
        rows_bytes=by_part["rows"],
        bodies_bytes=by_part["bodies"],
        index_bytes=by_part["index"],
        other_bytes=by_part["other"],
        captured_body_bytes=captured,
        blobs=blob_count,
        dedup_saved_bytes=saved,
        dedup_saved_raw_bytes=saved_raw,
        flows_last_day=last_day,
        not_converted=conversion.progress(conn).remaining,
    )


def outlook(stats: StorageStats, keep_days: int, max_rows: int, max_gb: float) -> RetentionOutlook:
    """At the last day's rate and today's bytes per flow, what keep_days, max_rows and max_gb would keep."""
    rate = float(stats.flows_last_day)
    per_flow = stats.used_bytes / stats.flows if stats.flows else 0.0
    limits = {}
    if keep_days:
        limits["keep_days"] = rate * keep_days
    if max_rows:
        limits["max_rows"] = float(max_rows)
    if max_gb and per_flow:
        limits["max_gb"] = max_gb * GB / per_flow
    if limits:
        limited_by = min(limits, key=limits.__getitem__)
        kept = limits[limited_by]
    else:
        limited_by, kept = "nothing", float("inf")
    kept_flows = int(kept) if kept != float("inf") else -1
    return RetentionOutlook(
        flows_per_day=rate,
        keep_days=keep_days,
        max_rows=max_rows,
        max_gb=max_gb,
        kept_flows=kept_flows,
        kept_bytes=int(kept_flows * per_flow) if kept_flows >= 0 else -1,
        limited_by=limited_by,
    )
