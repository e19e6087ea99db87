"""keyrotor's command line: start the proxy and the UI, manage upstream and client keys.

    run.py [serve] [--web]        proxy (mitmdump, or mitmweb with --web) and UI, stopped together
    run.py proxy [--web] | ui     one of them
    run.py keys add|list|enable|disable|delete|reset ...
    run.py clients add|list|enable|disable NAME
    run.py admin rotate           a new admin key (shown once); every UI session ends

Every command takes --config PATH and --set section.key=value (repeatable).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

if sys.version_info < (3, 12):  # noqa: UP036 - run.py may be started by an older python3
    sys.exit(
        "keyrotor needs Python 3.12+ (mitmproxy 12). Run it with the virtual environment"
        " that ./start.sh creates: .venv/bin/python run.py ..."
    )

from config import ADDON_SETTINGS, BY_NAME, ROOT, ConfigError, Settings, load_settings  # noqa: E402
from core.models import RESETTABLE, KeyState  # noqa: E402
from storage import client_keys, db, secrets, sessions, upstream_keys  # noqa: E402
from storage.upstream_keys import SqliteKeyStore  # noqa: E402
from usecases import keys as key_admin  # noqa: E402

SCRIPT = ROOT / "addons" / "keyrotor.py"
STOP_GRACE_SECONDS = 15


def parse_args(argv: list[str]) -> argparse.Namespace:
    # SUPPRESS: a subcommand's parser must not overwrite, with its default, a flag given
    # before the subcommand (`run.py --storage-path X keys list`).
    common = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    common.add_argument("--config", metavar="PATH", help="config file (default: config.toml, or $KEYROTOR_CONFIG)")
    common.add_argument(
        "--set",
        dest="overrides",
        action="append",
        metavar="SECTION.KEY=VALUE",
        help="override one setting, e.g. --set proxy.port=9000 (repeatable)",
    )
    common.add_argument("--upstream", help="same as --set proxy.upstream=URL")
    common.add_argument("--proxy-port", help="same as --set proxy.port=PORT")
    common.add_argument("--ui-port", help="same as --set ui.port=PORT")
    common.add_argument("--storage-path", help="same as --set storage.path=PATH")

    parser = argparse.ArgumentParser(prog="run.py", description=__doc__.split("\n")[0], parents=[common])
    commands = parser.add_subparsers(dest="command")
    for name, text in (("serve", "proxy and UI together"), ("proxy", "the proxy only")):
        sub = commands.add_parser(name, parents=[common], help=f"start {text}")
        sub.add_argument("--web", action="store_true", help="run mitmweb (flow inspector, admin key as password)")
    commands.add_parser("ui", parents=[common], help="start the monitor UI only")

    keys = commands.add_parser("keys", parents=[common], help="manage upstream keys").add_subparsers(
        dest="action", required=True
    )
    add = keys.add_parser("add", parents=[common], help="add keys, one per line, from files or standard input")
    add.add_argument("files", nargs="*", type=Path)
    keys.add_parser("list", parents=[common], help="list keys (masked) with state and usage")
    for action, text in (
        ("enable", "put keys back into rotation"),
        ("disable", "take keys out of rotation"),
        ("delete", "delete keys"),
        ("reset", "return keys (default: every invalid, exhausted or cooling one) to active"),
    ):
        sub = keys.add_parser(action, parents=[common], help=text)
        sub.add_argument("ids", nargs="*" if action == "reset" else "+", type=int, metavar="ID")
    validate = keys.add_parser(
        "validate",
        parents=[common],
        help="probe keys with GET /v1/models (no tokens spent): default every invalid or exhausted key",
    )
    validate.add_argument("ids", nargs="*", type=int, metavar="ID")
    validate.add_argument("--all", action="store_true", help="every key that is not disabled")
    weight = keys.add_parser("weight", parents=[common], help="set keys' share under the weighted strategy")
    weight.add_argument("weight", type=float, metavar="WEIGHT", help="above 0, at most 1000 (default 1)")
    weight.add_argument("ids", nargs="+", type=int, metavar="ID")

    clients = commands.add_parser("clients", parents=[common], help="manage client keys").add_subparsers(
        dest="action", required=True
    )
    clients.add_parser("list", parents=[common], help="list client keys with usage")
    for action, text in (
        ("add", "issue a key (shown once)"),
        ("disable", "reject a key"),
        ("enable", "accept it again"),
    ):
        clients.add_parser(action, parents=[common], help=text).add_argument("name")

    admin = commands.add_parser("admin", parents=[common], help="the admin key").add_subparsers(
        dest="action", required=True
    )
    admin.add_parser("rotate", parents=[common], help="replace the admin key (printed once) and end every session")

    args = parser.parse_args(argv)
    args.command = args.command or "serve"
    # Not parser.set_defaults(): `parents=` shares action objects, so that would change the
    # subcommands' defaults too and bring the overwriting back.
    for name, default in (
        ("web", False),
        ("config", None),
        ("overrides", []),
        ("upstream", None),
        ("proxy_port", None),
        ("ui_port", None),
        ("storage_path", None),
    ):
        if not hasattr(args, name):
            setattr(args, name, default)
    return args


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
    ):
        if getattr(args, flag):
            overrides[name] = getattr(args, flag)
    unknown = set(overrides) - set(BY_NAME)
    if unknown:
        raise ConfigError(f"--set {sorted(unknown)[0]} is not a keyrotor setting.")
    return load_settings(args.config, overrides)


def prepare_storage(settings: Settings) -> None:
    """Create the database and secrets on first use; show a generated admin key once."""
    db.ensure_database(settings.storage_path)
    secrets.key_cipher(settings.storage_path)
    admin_key = secrets.ensure_admin_key(settings.storage_path)
    if admin_key:
        print(
            f"\n  Admin key (log in to the UI with it; it is shown only this once):\n    {admin_key}\n",
            flush=True,
        )


def proxy_argv(settings: Settings, web: bool) -> list[str]:
    argv = [
        "-s",
        str(SCRIPT),
        "--mode",
        f"reverse:{settings['proxy.upstream']}",
        "--listen-host",
        settings["proxy.host"],
        "--listen-port",
        str(settings["proxy.port"]),
        "--set",
        f"keyrotor_storage={settings.storage_path}",
        # Also set by the addon when it starts running, but the listener opens before that:
        # on the command line it holds for the very first connection too.
        "--set",
        "connection_strategy=lazy",
    ]
    for setting in ADDON_SETTINGS:  # each is the addon option <section>_<key>
        argv += ["--set", f"{setting.section}_{setting.key}={settings[setting.name]}"]
    if web:
        argv += [
            "--set",
            f"web_host={settings['ui.host']}",
            "--set",
            f"web_port={settings['proxy.web_port']}",
            "--set",
            f"web_password={secrets.mitmweb_password(settings.storage_path)}",
            "--set",
            "web_open_browser=false",
        ]
    return argv


def run_proxy(settings: Settings, web: bool) -> int:
    from mitmproxy.tools import main

    (main.mitmweb if web else main.mitmdump)(proxy_argv(settings, web))
    return 0


def run_ui(settings: Settings) -> int:
    import uvicorn

    from monitor_ui.app import create_app

    uvicorn.run(create_app(settings), host=settings["ui.host"], port=settings["ui.port"], log_level="info")
    return 0


def serve(args: argparse.Namespace, settings: Settings, argv: list[str]) -> int:
    """Run proxy and UI as two child processes; stop both when either stops or we are told to."""
    passthrough = [a for a in argv if a not in ("serve", "--web")]
    run = [sys.executable, str(ROOT / "run.py")]
    children = [
        subprocess.Popen([*run, "proxy", *(["--web"] if args.web else []), *passthrough]),
        subprocess.Popen([*run, "ui", *passthrough]),
    ]
    print(
        f"keyrotor: proxy on http://{settings['proxy.host']}:{settings['proxy.port']}/v1"
        f" → {settings['proxy.upstream']}, UI on http://{settings['ui.host']}:{settings['ui.port']}/"
        + (f", mitmweb on http://{settings['ui.host']}:{settings['proxy.web_port']}/" if args.web else ""),
        flush=True,
    )
    stopping = False

    def stop(*_) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while not stopping and all(child.poll() is None for child in children):
        time.sleep(0.2)
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for child in children:
        try:
            child.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    codes = [child.returncode for child in children]
    # A child we stopped ends with 0 (or -SIGTERM); anything else is a failure worth passing on.
    return 0 if stopping else next((c for c in codes if c not in (0, -signal.SIGTERM)), 0)


def keys_command(args: argparse.Namespace, settings: Settings) -> int:
    path = settings.storage_path
    conn = db.connect(path)
    try:
        if args.action == "add":
            lines = _read_lines(args.files)
            report = key_admin.add_keys(SqliteKeyStore(conn, secrets.key_cipher(path)), lines)
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


def _validate(conn, settings: Settings, args: argparse.Namespace) -> int:
    store = SqliteKeyStore(conn, secrets.key_cipher(settings.storage_path))
    ids = key_admin.ids_to_validate(store, args.ids, args.all)
    if not ids:
        print("validate: no invalid or exhausted keys (use --all or IDs to probe others)")
        return 0
    results = asyncio.run(key_admin.validate_keys(store, settings["proxy.upstream"], ids))
    for result in results:
        detail = f" ({result.outcome.reason})" if result.outcome.reason else ""
        print(f"#{result.key_id} …{result.last4}: {result.outcome.kind}{detail} → {result.state}")
    missing = set(ids) - {r.key_id for r in results}
    if missing:
        print(f"skipped (no such key, or disabled): {', '.join(map(str, sorted(missing)))}")
    return 0 if results and not missing else 1


def clients_command(args: argparse.Namespace, settings: Settings) -> int:
    conn = db.connect(settings.storage_path)
    try:
        if args.action == "add":
            try:
                key = client_keys.create_client(conn, args.name)
            except client_keys.ClientExists as e:
                print(f"keyrotor: {e}", file=sys.stderr)
                return 1
            print(f"client {args.name!r} created; its key (shown only now):\n{key}")
            return 0
        if args.action == "list":
            _print_clients(client_keys.list_clients(conn))
            return 0
        count = client_keys.set_enabled(conn, args.name, args.action == "enable")
        if not count:
            print(f"keyrotor: no client named {args.name!r}", file=sys.stderr)
            return 1
        print(f"client {args.name!r} {args.action}d")
        return 0
    finally:
        conn.close()


def admin_command(args: argparse.Namespace, settings: Settings) -> int:
    """`admin rotate`: the old key stops working at once, in the UI and (within seconds) in mitmweb."""
    try:
        key = secrets.rotate_admin_key(settings.storage_path)
    except ValueError as e:
        print(f"keyrotor: {e}", file=sys.stderr)
        return 1
    ended = sessions.end_all(settings.storage_path)
    print(
        f"admin key replaced; {ended} UI session(s) ended. The new admin key (shown only now):\n{key}",
        flush=True,
    )
    return 0


def _read_lines(files: list[Path]) -> list[str]:
    if not files:
        return sys.stdin.read().splitlines()
    lines = []
    for file in files:
        lines += file.read_text().splitlines()
    return lines


def _when(timestamp: float | None) -> str:
    if not timestamp:
        return "-"
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _dollars(cost: float | None) -> str:
    return f"${cost or 0:.4f}"


def _print_keys(rows) -> None:
    print(
        f"{'id':>5}  {'key':<8}  {'state':<9}  {'weight':>6}  {'requests':>8}  {'tokens in/out':>17}  {'cost':>10}"
        f"  {'last used':<20}  reason"
    )
    for row in rows:
        reason = row["state_reason"] or ""
        if row["state"] == "cooling":
            reason += f" until {_when(row['cooldown_until'])}"
        tokens = f"{row['prompt_tokens']}/{row['completion_tokens']}"
        print(
            f"{row['id']:>5}  …{row['last4']:<7}  {row['state']:<9}  {row['weight']:>6g}  {row['requests']:>8}"
            f"  {tokens:>17}  {_dollars(row['cost']):>10}  {_when(row['last_used_at']):<20}  {reason}"
        )


def _print_clients(rows) -> None:
    print(
        f"{'id':>5}  {'name':<20}  {'key':<8}  {'enabled':<7}  {'requests':>8}  {'tokens in/out':>17}  {'cost':>10}"
        "  last used"
    )
    for row in rows:
        tokens = f"{row['prompt_tokens']}/{row['completion_tokens']}"
        print(
            f"{row['id']:>5}  {row['name']:<20}  …{row['last4']:<7}  {'yes' if row['enabled'] else 'no':<7}"
            f"  {row['requests']:>8}  {tokens:>17}  {_dollars(row['cost']):>10}  {_when(row['last_used_at'])}"
        )


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        settings = settings_from(args)
        prepare_storage(settings)
        if args.command == "serve":
            return serve(args, settings, argv)
        if args.command == "proxy":
            return run_proxy(settings, args.web)
        if args.command == "ui":
            return run_ui(settings)
        if args.command == "keys":
            return keys_command(args, settings)
        if args.command == "admin":
            return admin_command(args, settings)
        return clients_command(args, settings)
    except ConfigError as e:
        print(f"keyrotor: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:
        print(f"keyrotor: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
