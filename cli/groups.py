"""`groups`: add, list, enable, disable and delete upstream groups, each with a key pool of its own."""

from __future__ import annotations

import argparse
import sqlite3

from cli.common import on_routes
from config import Settings
from storage import routes


def command(args: argparse.Namespace, settings: Settings) -> int:
    return on_routes(settings, lambda conn: _groups(conn, args))


def _groups(conn: sqlite3.Connection, args: argparse.Namespace) -> int:
    if args.action == "add":
        routes.add_group(conn, args.label, args.priority, args.weight)
        print(f"group {args.label!r} added; give it keys: run.py keys add --group {args.label} FILE")
    elif args.action == "list":
        print(f"{'group':<32}  {'priority':>8}  {'weight':>6}  {'enabled':<7}  {'keys':>5}  models")
        for row in routes.list_groups(conn):
            enabled = "yes" if row["enabled"] and row["upstream_enabled"] else "no"
            models = row["models"] or "every model"
            print(
                f"{row['label']:<32}  {row['priority']:>8}  {row['weight']:>6g}  {enabled:<7}  {row['keys']:>5}"
                f"  {models}"
            )
    elif args.action == "delete":
        keys = routes.delete_group(conn, routes.group_id_of(conn, args.label))
        print(f"group {args.label!r} deleted with {keys} key(s)")
    else:
        routes.set_group_enabled(conn, routes.group_id_of(conn, args.label), args.action == "enable")
        print(f"group {args.label!r} {args.action}d")
    return 0
