"""`storage`: the capture database's size and retention outlook (`stats`), and converting old flows (`migrate`)."""

from __future__ import annotations

import argparse
import time

from cli.common import when
from config import Settings
from storage import conversion, db, stats


def command(args: argparse.Namespace, settings: Settings) -> int:
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
