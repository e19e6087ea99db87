"""`clients`: clients, their keys (shown once) and their limits; each client's spend."""

from __future__ import annotations

import argparse
import sqlite3
import sys
import time

from cli.common import dollars, when
from cli.parser import FLAG_FIELDS, LIMIT_FLAGS
from config import Settings
from core.limits import NO_LIMITS, ClientPolicy, LimitError, limits_shown, policy_with
from storage import client_keys, db
from storage.counters import clients_spend


def command(args: argparse.Namespace, settings: Settings) -> int:
    conn = db.connect(settings.storage_path)
    try:
        return _clients(conn, args)
    except (client_keys.ClientNotFound, client_keys.ClientExists, LimitError) as e:
        print(f"keyrotor: {e}", file=sys.stderr)
        return 1
    finally:
        conn.close()


def _clients(conn: sqlite3.Connection, args: argparse.Namespace) -> int:
    if args.action == "add":
        policy = policy_with(NO_LIMITS, _limit_changes(args))
        key = client_keys.create_client(conn, args.name, policy)
        legacy = getattr(args, "legacy_objects", None)
        if legacy:
            client_keys.set_legacy_objects(conn, args.name, True)
        print(f"client {args.name!r} created{_limits_text(policy, ' with ')}; its key (shown only now):\n{key}")
        return 0
    if args.action == "set":
        changes = _limit_changes(args)
        legacy = getattr(args, "legacy_objects", None)
        if not changes and legacy is None:
            print("keyrotor: give at least one limit to set, e.g. --rpm 60 (or --rpm none)", file=sys.stderr)
            return 2
        if legacy is not None:
            client_keys.set_legacy_objects(conn, args.name, legacy)
        if changes:
            policy = client_keys.set_limits(conn, args.name, changes)
        else:
            policy = client_keys.policy_of(client_keys.client_row(conn, args.name)["limits"])
        text = _limits_text(policy) or "no limits"
        if legacy is not None:
            text += f"; objects of no client: {'reachable' if legacy else 'not reachable'}"
        print(f"client {args.name!r}: {text}")
        return 0
    if args.action == "list":
        _print_clients(conn, client_keys.list_clients(conn))
        return 0
    if args.action == "keys":
        return _client_keys(conn, args)
    count = client_keys.set_enabled(conn, args.name, args.action == "enable")
    if not count:
        print(f"keyrotor: no client named {args.name!r}", file=sys.stderr)
        return 1
    print(f"client {args.name!r} {args.action}d")
    return 0


def _client_keys(conn: sqlite3.Connection, args: argparse.Namespace) -> int:
    if args.key_action == "add":
        key_id, key = client_keys.add_key(conn, args.name)
        print(f"key #{key_id} added to {args.name!r} (shown only now):\n{key}")
        return 0
    if args.key_action == "list":
        print(f"{'id':>5}  {'key':<8}  {'state':<8}  {'requests':>8}  {'cost':>10}  {'created':<20}  last used")
        for row in client_keys.list_keys(conn, args.name):
            state = "revoked" if row["revoked_at"] else "active" if row["enabled"] else "disabled"
            print(
                f"{row['id']:>5}  …{row['last4']:<7}  {state:<8}  {row['requests']:>8}  {dollars(row['cost']):>10}"
                f"  {when(row['created_at']):<20}  {when(row['last_used_at'])}"
            )
        return 0
    if args.key_id is None:
        print("keyrotor: which key? run.py clients keys NAME revoke KEY_ID", file=sys.stderr)
        return 2
    if not client_keys.revoke_key(conn, args.name, args.key_id):
        print(f"keyrotor: {args.name!r} has no key #{args.key_id} that is not revoked already", file=sys.stderr)
        return 1
    print(f"key #{args.key_id} of {args.name!r} revoked")
    return 0


def _limit_changes(args: argparse.Namespace) -> dict[str, str | None]:
    changes: dict[str, str | None] = {}
    for flag, _, _ in LIMIT_FLAGS:
        dest = flag[2:].replace("-", "_")
        value = getattr(args, dest, None)
        if value is not None:
            changes[FLAG_FIELDS.get(dest, dest)] = value
    return changes


def _limits_text(policy: ClientPolicy, prefix: str = "") -> str:
    text = ", ".join(f"{name}={value}" for name, value in limits_shown(policy).items())
    return f"{prefix}{text}" if text else ""


def _print_clients(conn: sqlite3.Connection, rows: list[sqlite3.Row]) -> None:
    spend = clients_spend(conn, [row["id"] for row in rows], time.time())
    print(
        f"{'id':>5}  {'name':<20}  {'keys':>4}  {'enabled':<7}  {'requests':>8}  {'today tokens/$':>20}"
        f"  {'month tokens/$':>20}  {'last used':<20}  limits"
    )
    for row in rows:
        s = spend[row["id"]]
        today = f"{int(s['day_tokens'])}/{dollars(s['day_usd'])}"
        month = f"{int(s['month_tokens'])}/{dollars(s['month_usd'])}"
        limits = _limits_text(client_keys.policy_of(row["limits"])) or "-"
        print(
            f"{row['id']:>5}  {row['name']:<20}  {row['keys']:>4}  {'yes' if row['enabled'] else 'no':<7}"
            f"  {row['requests']:>8}  {today:>20}  {month:>20}  {when(row['last_used_at']):<20}  {limits}"
        )
