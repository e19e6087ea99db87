"""`storage`: the capture database's size and retention outlook (`stats`), converting old flows (`migrate`),
and copying an SQLite database into PostgreSQL (`copy`)."""

from __future__ import annotations

import argparse
import sqlite3
import sys
import time
from urllib.parse import urlsplit

from cli.common import when
from config import Settings
from storage import conversion, db, pg, stats
from storage import copy as copy_module
from storage.copy import Copied, CopyRefused, copy_database


def copy(args: argparse.Namespace, settings: Settings) -> int:
    """storage.path's SQLite database into the PostgreSQL database at --to (or storage.url)."""
    url = args.to or settings.storage.url
    if not pg.is_url(url):
        print("keyrotor: storage copy needs --to postgresql://… (or storage.url set)", file=sys.stderr)
        return 2
    if urlsplit(url).password:
        print(
            "keyrotor: the URL's password is visible to other users in the process list while this runs;"
            " PGPASSWORD or ~/.pgpass keep it out of --to",
            file=sys.stderr,
        )
    if not settings.storage_path.exists():
        print(f"keyrotor: there is no SQLite database at {settings.storage_path}", file=sys.stderr)
        return 1
    print(
        f"copying {settings.storage_path} into {pg.redact(url)}, {copy_module.CHUNK} rows per transaction", flush=True
    )
    source = db.connect_sqlite(settings.storage_path, readonly=True)
    target = pg.connect(url)
    started = time.monotonic()
    shown: dict[str, float] = {}

    def report(copied: Copied) -> None:
        now = time.monotonic()
        if copied.rows >= copied.total or now - shown.get(copied.table, 0.0) >= 1.0:
            shown[copied.table] = now
            print(f"  {copied.table}: {copied.rows:,} copied, {copied.total:,} in SQLite", flush=True)

    try:
        done = copy_database(source, target, report)
    except CopyRefused as e:
        print(f"keyrotor: {e}", file=sys.stderr)
        return 1
    except sqlite3.Error as e:
        print(f"keyrotor: the copy stopped ({e}); run the same command again to go on", file=sys.stderr)
        return 1
    finally:
        source.close()
        target.close()
    rows = sum(c.rows for c in done)
    print(f"done: {rows:,} rows copied in {time.monotonic() - started:.1f} s; set storage.url to use the copy")
    return 0


def command(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "copy":
        return copy(args, settings)
    conn = db.connect(settings.storage_path)
    try:
        if args.action == "migrate":
            started = time.monotonic()
            left = conversion.progress(conn).remaining
            print(f"converting {left:,} flows stored before compression, {conversion.CHUNK} per transaction")

            def report(converted: int, remaining: int) -> None:
                left = f"{remaining:,} to go" if remaining else "removing the old full-text index"
                print(f"  {converted:,} converted, {left}", flush=True)

            done = conversion.convert_all(conn, report)
            print(f"done: {done:,} flows converted in {time.monotonic() - started:.1f} s; the old index is dropped")
            return 0
        found = stats.collect(conn, settings.storage_path)
        seen = stats.outlook(
            found, settings["capture.keep_days"], settings["capture.max_rows"], settings["capture.max_gb"]
        )
    finally:
        conn.close()
    print(_storage_report(found, seen))
    return 0


def _storage_report(found: stats.StorageStats, seen: stats.RetentionOutlook) -> str:
    def size(n: float) -> str:
        return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"

    lines = [
        f"flows            {found.flows:,} (oldest {when(found.oldest_at)}, newest {when(found.newest_at)})",
        f"database file    {size(found.file_bytes)}, {size(found.used_bytes)} in use"
        f" ({size(found.file_bytes - found.used_bytes)} free pages that new flows fill first)",
        "bytes per flow   "
        + ", ".join(
            f"{name} {found.per_flow(n):,.0f}"
            for name, n in (
                ("rows", found.rows_bytes),
                ("bodies", found.bodies_bytes),
                ("index", found.index_bytes),
                ("other", found.other_bytes),
            )
        )
        + f" = {found.per_flow(found.used_bytes):,.0f} in use",
        f"bodies           {size(found.captured_body_bytes)} as captured,"
        f" {size(found.bodies_bytes)} stored with their headers",
        f"dedup            {found.blobs:,} repeated parts stored once; saved {size(found.dedup_saved_bytes)}"
        f" ({size(found.dedup_saved_raw_bytes)} as captured, {found.per_flow(found.dedup_saved_raw_bytes):,.0f}"
        " per flow)",
    ]
    if found.not_converted:
        lines.append(f"not converted    {found.not_converted:,} flows from before compression (run.py storage migrate)")
    limits = f"keep_days={seen.keep_days}, max_rows={seen.max_rows}, max_gb={seen.max_gb:g}"
    if seen.kept_flows < 0:
        outlook = f"keeps every flow ({limits}): at this rate the database grows without limit"
    else:
        outlook = f"keeps about {seen.kept_flows:,} flows, {size(seen.kept_bytes)} ({limits}; {seen.limited_by} binds)"
    lines.append(f"retention        {seen.flows_per_day:,.0f} flows in the last 24 h; {outlook}")
    return "\n".join(lines)
