"""`models`: which groups serve which models, under which upstream name, and each model's fallbacks."""

from __future__ import annotations

import argparse
import asyncio
import sqlite3

from cli.common import on_routes
from config import Settings
from storage import routes, secrets
from storage.upstream_keys import SqliteKeyStore
from usecases import models as model_admin


def command(args: argparse.Namespace, settings: Settings) -> int:
    return on_routes(settings, lambda conn: _models(conn, args, settings))


def _models(conn: sqlite3.Connection, args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "refresh":
        return _refresh_models(conn, settings, args.label)
    if args.action == "add":
        routes.add_model(conn, routes.group_id_of(conn, args.label), args.model, args.upstream_model)
        alias = f" as {args.upstream_model!r} upstream" if args.upstream_model else ""
        print(f"{args.label} serves {args.model!r}{alias}")
    elif args.action == "delete":
        routes.delete_model(conn, routes.group_id_of(conn, args.label), args.model)
        print(f"{args.label} no longer serves {args.model!r}")
    elif args.action == "list":
        print(f"{'model':<32}  {'upstream/group':<32}  upstream name")
        for row in routes.list_models(conn):
            print(f"{row['model']:<32}  {row['label']:<32}  {row['upstream_model'] or row['model']}")
        for group in routes.list_groups(conn):
            if not group["models"]:
                print(f"{'(every model)':<32}  {group['label']:<32}  as asked")
        for model, fallbacks in routes.fallbacks(conn).items():
            print(f"fallback: {model} → {' → '.join(fallbacks)}")
    else:
        routes.set_fallbacks(conn, args.model, args.fallbacks)
        print(f"{args.model}: " + (f"falls back to {', '.join(args.fallbacks)}" if args.fallbacks else "no fallbacks"))
    return 0


def _refresh_models(conn: sqlite3.Connection, settings: Settings, label: str | None) -> int:
    groups = list(routes.groups_by_id(conn).values())
    if label is not None:
        wanted = routes.group_id_of(conn, label)
        groups = [g for g in groups if g.id == wanted]
    store = SqliteKeyStore(conn, secrets.key_cipher(settings.storage_path))
    results = asyncio.run(
        model_admin.refresh_models(store, routes.SqliteRouteStore(conn), groups, settings["proxy.upstream"])
    )
    for result in results:
        if result.error:
            print(f"{result.group}: not refreshed: {result.error}")
        else:
            print(f"{result.group}: {result.listed} model(s) listed, {result.added} added, {result.removed} removed")
    return 0 if results and all(r.error is None for r in results) else 1
