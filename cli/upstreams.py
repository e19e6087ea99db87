"""`upstreams`: add, list, enable, disable and delete upstreams (OpenAI, Azure, relays)."""

from __future__ import annotations

import argparse
import sqlite3

from cli.common import on_routes
from config import Settings, parse_http_url
from core.routing import Dialect
from storage import routes


def command(args: argparse.Namespace, settings: Settings) -> int:
    return on_routes(settings, lambda conn: _upstreams(conn, args, settings))


def _upstreams(conn: sqlite3.Connection, args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "add":
        url = parse_http_url(args.url)
        routes.add_upstream(conn, args.name, url, Dialect(args.dialect), args.api_version)
        print(f"upstream {args.name!r} added ({args.dialect}, {url}); add a group: run.py groups add {args.name}/NAME")
    elif args.action == "list":
        print(f"{'name':<20}  {'dialect':<7}  {'enabled':<7}  {'groups':>6}  {'keys':>5}  url")
        for row in routes.list_upstreams(conn):
            url = row["base_url"] or f"{settings['proxy.upstream']} (proxy.upstream)"
            version = f"  api-version={row['api_version']}" if row["api_version"] else ""
            print(
                f"{row['name']:<20}  {row['dialect']:<7}  {'yes' if row['enabled'] else 'no':<7}"
                f"  {row['groups']:>6}  {row['keys']:>5}  {url}{version}"
            )
    elif args.action == "delete":
        keys = routes.delete_upstream(conn, args.name)
        print(f"upstream {args.name!r} deleted with its groups and {keys} key(s)")
    else:
        routes.set_upstream_enabled(conn, args.name, args.action == "enable")
        print(f"upstream {args.name!r} {args.action}d")
    return 0
