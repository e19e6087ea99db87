"""`keys`: add, list, rename, enable, disable, delete, reset, validate and weigh upstream keys."""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
import time
from pathlib import Path

from cli.common import dollars, when
from config import Settings
from core.models import RESETTABLE, KeyState
from storage import db, routes, secrets, upstream_keys
from storage.upstream_keys import SqliteKeyStore
from usecases import keys as key_admin


def command(args: argparse.Namespace, settings: Settings) -> int:
    path = settings.storage_path
    conn = db.connect(path)
    try:
        if args.action == "add":
            lines = _read_lines(args.files)
            store = SqliteKeyStore(conn, secrets.key_cipher(path))
            group_id = routes.group_id_of(conn, args.group) if getattr(args, "group", None) else None
            report = key_admin.add_keys(store, lines, getattr(args, "name", None), group_id)
            print(
                f"added {len(report.added)}, skipped {report.duplicates} duplicate(s),"
                f" rejected {len(report.malformed)} malformed"
                + (f" (line {', '.join(map(str, report.malformed))})" if report.malformed else "")
            )
            return 0
        if args.action == "list":
            _print_keys(upstream_keys.list_keys(conn))
            return 0
        if args.action == "validate":
            return _validate(conn, settings, args)
        if args.action == "rename":
            if not upstream_keys.rename_key(conn, args.id, args.name):
                print(f"keyrotor: no upstream key with id {args.id}", file=sys.stderr)
                return 1
            print(f"key #{args.id} " + (f"is now named {args.name.strip()!r}" if args.name.strip() else "has no name"))
            return 0
        if args.action == "delete":
            count = upstream_keys.delete_keys(conn, args.ids)
        elif args.action == "weight":
            count = upstream_keys.set_weight(conn, args.ids, args.weight)
        elif args.action == "reset":
            ids = args.ids or upstream_keys.ids_in_state(conn, RESETTABLE)
            count = upstream_keys.set_admin_state(conn, ids, KeyState.ACTIVE, "reset by admin")
        else:
            state = KeyState.ACTIVE if args.action == "enable" else KeyState.DISABLED
            count = upstream_keys.set_admin_state(conn, args.ids, state, f"{args.action}d by admin")
        print(f"{args.action}: {count} key(s)")
        return 0 if count or not getattr(args, "ids", None) else 1
    finally:
        conn.close()


def _validate(conn: sqlite3.Connection, settings: Settings, args: argparse.Namespace) -> int:
    store = SqliteKeyStore(conn, secrets.key_cipher(settings.storage_path))
    ids = key_admin.ids_to_validate(store, args.ids, args.all)
    if not ids:
        print("validate: no invalid or exhausted keys (use --all or IDs to probe others)")
        return 0
    groups = routes.groups_by_id(conn)
    results = asyncio.run(key_admin.validate_keys(store, groups, settings["proxy.upstream"], ids))
    for result in results:
        detail = f" ({result.outcome.reason})" if result.outcome.reason else ""
        print(f"#{result.key_id} …{result.last4}: {result.outcome.kind}{detail} → {result.state}")
    missing = set(ids) - {r.key_id for r in results}
    if missing:
        print(f"skipped (no such key, or disabled): {', '.join(map(str, sorted(missing)))}")
    return 0 if results and not missing else 1


def _read_lines(files: list[Path]) -> list[str]:
    if not files:
        return sys.stdin.read().splitlines()
    lines = []
    for file in files:
        lines += file.read_text().splitlines()
    return lines


def _cooldown(row: sqlite3.Row, now: float) -> str:
    if row["state"] != "cooling" or not row["cooldown_until"]:
        return ""
    if row["cooldown_until"] <= now:
        return " cooldown over: the next request tries it"
    return f" until {when(row['cooldown_until'])}"


def _print_keys(rows: list[sqlite3.Row]) -> None:
    print(
        f"{'id':>5}  {'name':<20}  {'key':<8}  {'group':<24}  {'state':<9}  {'weight':>6}  {'requests':>8}"
        f"  {'tokens in/out':>17}  {'cost':>10}  {'last used':<20}  reason"
    )
    now = time.time()
    for row in rows:
        reason = (row["state_reason"] or "") + _cooldown(row, now)
        tokens = f"{row['prompt_tokens']}/{row['completion_tokens']}"
        print(
            f"{row['id']:>5}  {row['name'] or '-':<20}  …{row['last4']:<7}  {row['group_label'] or '-':<24}"
            f"  {row['state']:<9}  {row['weight']:>6g}  {row['requests']:>8}  {tokens:>17}"
            f"  {dollars(row['cost']):>10}  {when(row['last_used_at']):<20}  {reason}"
        )
