"""run.py's main(): parse the command line, load the settings, prepare storage, run the command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from cli import admin, alerts, clients, common, demo, flows, groups, keys, models, playground, serve, traces, upstreams
from cli import storage as storage_command  # not the storage package, imported below
from cli.parser import parse_args
from config import BY_NAME, ConfigError, Settings, load_settings
from storage import audit, db, routes, secrets

Command = Callable[[argparse.Namespace, Settings], int]
COMMANDS: dict[str, Command] = {
    "serve": serve.serve,
    "proxy": serve.proxy,
    "ui": serve.ui,
    "demo": demo.command,
    "keys": keys.command,
    "upstreams": upstreams.command,
    "groups": groups.command,
    "models": models.command,
    "clients": clients.command,
    "admin": admin.command,
    "storage": storage_command.command,
    "flows": flows.command,
    "traces": traces.command,
    "playground": playground.command,
    "alerts": alerts.command,
}
SERVERS = ("serve", "proxy", "ui")  # the other commands change storage, as the CLI in the audit log
OWN_STORAGE = ("demo",)  # commands that prepare a database of their own, never storage.path's


def settings_from(args: argparse.Namespace) -> Settings:
    overrides = {}
    for item in args.overrides:
        name, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r} must look like section.key=value.")
        overrides[name.strip()] = value
    for flag, name in (
        ("upstream", "proxy.upstream"),
        ("proxy_port", "proxy.port"),
        ("ui_port", "ui.port"),
        ("storage_path", "storage.path"),
        ("workers", "proxy.workers"),
    ):
        if getattr(args, flag):
            overrides[name] = getattr(args, flag)
    unknown = set(overrides) - set(BY_NAME)
    if unknown:
        raise ConfigError(f"--set {sorted(unknown)[0]} is not a keyrotor setting.")
    return load_settings(args.config, overrides)


def prepare_storage(settings: Settings) -> None:
    """Create the database and secrets on first use; show a generated admin key once."""
    common.use_storage(settings)
    db.ensure_database(settings.storage_path)
    secrets.key_cipher(settings.storage_path)
    admin_key = secrets.ensure_admin_key(settings.storage_path)
    if admin_key:
        print(
            f"\n  Admin key (log in to the UI with it; it is shown only this once):\n    {admin_key}\n",
            flush=True,
        )


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.command not in SERVERS:
        audit.set_actor(audit.Actor(audit.CLI))  # every change this command makes is the CLI's, in the audit log
    try:
        settings = settings_from(args)
        if settings.redis.url:  # admin changes this command makes reach every proxy node at once (docs/redis.md)
            from storage import redis_shared

            redis_shared.announce_revisions(settings.redis.url)
        if args.command not in OWN_STORAGE:
            prepare_storage(settings)
        return COMMANDS[args.command](args, settings)
    except ConfigError as e:
        print(f"keyrotor: {e}", file=sys.stderr)
        return 2
    except routes.NotFound as e:
        print(f"keyrotor: {e}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:
        print(f"keyrotor: {e}", file=sys.stderr)
        return 2
