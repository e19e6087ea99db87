"""keyrotor's command line: start the proxy and the UI, manage upstream and client keys.

    run.py [serve] [--web]        proxy (mitmdump, or mitmweb with --web) and UI, stopped together
    run.py proxy [--web] | ui     one of them
    run.py keys add|list|rename|enable|disable|delete|reset|validate|weight ...
    run.py clients add|set NAME [limits] | keys NAME add|list|revoke KEY_ID | list | enable|disable NAME
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

from config import ADDON_SETTINGS, BY_NAME, ROOT, ConfigError, Settings, load_settings, parse_http_url  # noqa: E402
from core.limits import NO_LIMITS, LimitError, limits_shown, policy_with  # noqa: E402
from core.models import RESETTABLE, KeyState  # noqa: E402
from core.routing import Dialect  # noqa: E402
from storage import audit, client_keys, db, routes, secrets, sessions, upstream_keys  # noqa: E402
from storage.counters import clients_spend  # noqa: E402
from storage.upstream_keys import SqliteKeyStore  # noqa: E402
from usecases import keys as key_admin  # noqa: E402
from usecases import models as model_admin  # noqa: E402

SCRIPT = ROOT / "addons" / "keyrotor.py"
# `clients add|set` flags: (flag, metavar, help); each maps to core.limits.ClientPolicy's field.
LIMIT_FLAGS = (
    ("--models", "LIST", "models it may use, comma-separated; * is a wildcard (gpt-4o*)"),
    ("--groups", "LIST", "UPSTREAM/GROUP labels it may be served by, comma-separated"),
    ("--rpm", "N", "requests per minute"),
    ("--tpm", "N", "tokens per minute"),
    ("--max-parallel", "N", "requests in flight at once"),
    ("--daily-tokens", "N", "token budget per UTC day"),
    ("--monthly-tokens", "N", "token budget per UTC month"),
    ("--daily-usd", "X", "cost budget per UTC day, in USD (prices.toml)"),
    ("--monthly-usd", "X", "cost budget per UTC month, in USD"),
    ("--expires", "ISO-DATE", "the keys stop working then (UTC unless it says otherwise)"),
    ("--ips", "LIST", "addresses and CIDR ranges it may call from, comma-separated (v4 and v6)"),
)
FLAG_FIELDS = {"expires": "expires_at"}  # flag dest → policy field, where they differ
# How long `serve` waits for its children beyond the proxy's own grace for requests in
# flight: the writer's flush (up to writer.STOP_RETRY_SECONDS when the database refuses writes).
STOP_MARGIN_SECONDS = 15


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
    add = keys.add_parser(
        "add", parents=[common], help="add keys, one per line (or NAME<TAB>KEY), from files or standard input"
    )
    add.add_argument("files", nargs="*", type=Path)
    add.add_argument("--name", help="name for the added keys whose line gives none")
    add.add_argument(
        "--group", metavar="UPSTREAM/GROUP", help="the group whose pool they join (default default/default)"
    )
    rename = keys.add_parser("rename", parents=[common], help='name a key ("" clears the name)')
    rename.add_argument("id", type=int, metavar="ID")
    rename.add_argument("name", metavar="NAME")
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

    upstreams = commands.add_parser("upstreams", parents=[common], help="manage upstreams").add_subparsers(
        dest="action", required=True
    )
    add_upstream = upstreams.add_parser("add", parents=[common], help="add an upstream (OpenAI, Azure, a relay)")
    add_upstream.add_argument("name")
    add_upstream.add_argument("url", help="base URL, e.g. https://api.openai.com or https://RESOURCE.openai.azure.com")
    add_upstream.add_argument("--dialect", choices=[d.value for d in Dialect], default=Dialect.OPENAI.value)
    add_upstream.add_argument("--api-version", help="Azure's api-version (default 2024-10-21)")
    upstreams.add_parser("list", parents=[common], help="list upstreams")
    for action, text in (
        ("enable", "route to it again"),
        ("disable", "route nothing to it"),
        ("delete", "delete it with its groups and their keys"),
    ):
        upstreams.add_parser(action, parents=[common], help=text).add_argument("name")

    groups = commands.add_parser("groups", parents=[common], help="manage upstream groups").add_subparsers(
        dest="action", required=True
    )
    add_group = groups.add_parser("add", parents=[common], help="add a group with a key pool of its own")
    add_group.add_argument("label", metavar="UPSTREAM/GROUP")
    add_group.add_argument("--priority", type=int, default=0, help="higher is tried first (default 0)")
    add_group.add_argument("--weight", type=float, default=1.0, help="share within its priority (default 1)")
    groups.add_parser("list", parents=[common], help="list groups")
    for action, text in (
        ("enable", "route to it again"),
        ("disable", "route nothing to it"),
        ("delete", "delete it with its keys and models"),
    ):
        groups.add_parser(action, parents=[common], help=text).add_argument("label", metavar="UPSTREAM/GROUP")

    models = commands.add_parser("models", parents=[common], help="which groups serve which models").add_subparsers(
        dest="action", required=True
    )
    refresh = models.add_parser("refresh", parents=[common], help="ask upstream for each group's models")
    refresh.add_argument("label", nargs="?", metavar="UPSTREAM/GROUP", help="one group (default: every group)")
    add_model = models.add_parser("add", parents=[common], help="serve MODEL from a group")
    add_model.add_argument("label", metavar="UPSTREAM/GROUP")
    add_model.add_argument("model", metavar="MODEL")
    add_model.add_argument(
        "--as",
        dest="upstream_model",
        metavar="UPSTREAM_NAME",
        help="the name upstream uses (an Azure deployment, a relay's model)",
    )
    delete_model = models.add_parser("delete", parents=[common], help="stop serving MODEL from a group")
    delete_model.add_argument("label", metavar="UPSTREAM/GROUP")
    delete_model.add_argument("model", metavar="MODEL")
    models.add_parser("list", parents=[common], help="model, upstream/group, upstream name")
    fallback = models.add_parser("fallback", parents=[common], help="models tried after every group of MODEL")
    fallback.add_argument("model", metavar="MODEL")
    fallback.add_argument("fallbacks", nargs="*", metavar="FALLBACK", help="in order; none clears them")

    clients = commands.add_parser("clients", parents=[common], help="manage clients, their keys and limits")
    client_actions = clients.add_subparsers(dest="action", required=True)
    client_actions.add_parser("list", parents=[common], help="each client's limits, spend this day/month, last use")
    for action, text in (
        ("add", "create a client and issue its first key (shown once)"),
        ("set", "change a client's limits ('none' clears one)"),
    ):
        sub = client_actions.add_parser(action, parents=[common], help=text)
        sub.add_argument("name")
        for flag, metavar, help_text in LIMIT_FLAGS:
            sub.add_argument(flag, metavar=metavar, help=help_text)
    client_keys_parser = client_actions.add_parser("keys", parents=[common], help="a client's keys")
    client_keys_parser.add_argument("name")
    client_keys_parser.add_argument("key_action", choices=["add", "list", "revoke"])
    client_keys_parser.add_argument("key_id", nargs="?", type=int, metavar="KEY_ID")
    for action, text in (("disable", "refuse every key of the client"), ("enable", "accept them again")):
        client_actions.add_parser(action, parents=[common], help=text).add_argument("name")

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
    deadline = time.monotonic() + settings["proxy.stop_grace_seconds"] + STOP_MARGIN_SECONDS
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


def _validate(conn, settings: Settings, args: argparse.Namespace) -> int:
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


def _on_routes(settings: Settings, act) -> int:
    """Run one upstreams/groups/models command; a missing or taken name is a sentence and exit 1."""
    conn = db.connect(settings.storage_path)
    try:
        return act(conn)
    except (routes.NotFound, routes.Conflict) as e:
        print(f"keyrotor: {e}", file=sys.stderr)
        return 1
    finally:
        conn.close()


def upstreams_command(args: argparse.Namespace, settings: Settings) -> int:
    return _on_routes(settings, lambda conn: _upstreams(conn, args, settings))


def _upstreams(conn, args: argparse.Namespace, settings: Settings) -> int:
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


def groups_command(args: argparse.Namespace, settings: Settings) -> int:
    return _on_routes(settings, lambda conn: _groups(conn, args, settings))


def _groups(conn, args: argparse.Namespace, settings: Settings) -> int:
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


def models_command(args: argparse.Namespace, settings: Settings) -> int:
    return _on_routes(settings, lambda conn: _models(conn, args, settings))


def _models(conn, args: argparse.Namespace, settings: Settings) -> int:
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


def _refresh_models(conn, settings: Settings, label: str | None) -> int:
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


def _limit_changes(args: argparse.Namespace) -> dict[str, str]:
    changes = {}
    for flag, _, _ in LIMIT_FLAGS:
        dest = flag[2:].replace("-", "_")
        value = getattr(args, dest, None)
        if value is not None:
            changes[FLAG_FIELDS.get(dest, dest)] = value
    return changes


def clients_command(args: argparse.Namespace, settings: Settings) -> int:
    conn = db.connect(settings.storage_path)
    try:
        return _clients(conn, args)
    except (client_keys.ClientNotFound, client_keys.ClientExists, LimitError) as e:
        print(f"keyrotor: {e}", file=sys.stderr)
        return 1
    finally:
        conn.close()


def _clients(conn, args: argparse.Namespace) -> int:
    if args.action == "add":
        policy = policy_with(NO_LIMITS, _limit_changes(args))
        key = client_keys.create_client(conn, args.name, policy)
        print(f"client {args.name!r} created{_limits_text(policy, ' with ')}; its key (shown only now):\n{key}")
        return 0
    if args.action == "set":
        changes = _limit_changes(args)
        if not changes:
            print("keyrotor: give at least one limit to set, e.g. --rpm 60 (or --rpm none)", file=sys.stderr)
            return 2
        policy = client_keys.set_limits(conn, args.name, changes)
        print(f"client {args.name!r}: {_limits_text(policy) or 'no limits'}")
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


def _client_keys(conn, args: argparse.Namespace) -> int:
    if args.key_action == "add":
        key_id, key = client_keys.add_key(conn, args.name)
        print(f"key #{key_id} added to {args.name!r} (shown only now):\n{key}")
        return 0
    if args.key_action == "list":
        print(f"{'id':>5}  {'key':<8}  {'state':<8}  {'requests':>8}  {'cost':>10}  {'created':<20}  last used")
        for row in client_keys.list_keys(conn, args.name):
            state = "revoked" if row["revoked_at"] else "active" if row["enabled"] else "disabled"
            print(
                f"{row['id']:>5}  …{row['last4']:<7}  {state:<8}  {row['requests']:>8}  {_dollars(row['cost']):>10}"
                f"  {_when(row['created_at']):<20}  {_when(row['last_used_at'])}"
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


def _limits_text(policy, prefix: str = "") -> str:
    text = ", ".join(f"{name}={value}" for name, value in limits_shown(policy).items())
    return f"{prefix}{text}" if text else ""


def admin_command(args: argparse.Namespace, settings: Settings) -> int:
    """`admin rotate`: the old key stops working at once, in the UI and (within seconds) in mitmweb."""
    try:
        key = secrets.rotate_admin_key(settings.storage_path)
    except ValueError as e:
        print(f"keyrotor: {e}", file=sys.stderr)
        return 1
    ended = sessions.end_all(settings.storage_path)
    audit.log_now(settings.storage_path, "admin.rotate", None, {"sessions_ended": ended})
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


def _cooldown(row, now: float) -> str:
    if row["state"] != "cooling" or not row["cooldown_until"]:
        return ""
    if row["cooldown_until"] <= now:
        return " cooldown over: the next request tries it"
    return f" until {_when(row['cooldown_until'])}"


def _print_keys(rows) -> None:
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
            f"  {_dollars(row['cost']):>10}  {_when(row['last_used_at']):<20}  {reason}"
        )


def _print_clients(conn, rows) -> None:
    spend = clients_spend(conn, [row["id"] for row in rows], time.time())
    print(
        f"{'id':>5}  {'name':<20}  {'keys':>4}  {'enabled':<7}  {'requests':>8}  {'today tokens/$':>20}"
        f"  {'month tokens/$':>20}  {'last used':<20}  limits"
    )
    for row in rows:
        s = spend[row["id"]]
        today = f"{int(s['day_tokens'])}/{_dollars(s['day_usd'])}"
        month = f"{int(s['month_tokens'])}/{_dollars(s['month_usd'])}"
        limits = _limits_text(client_keys.policy_of(row["limits"])) or "-"
        print(
            f"{row['id']:>5}  {row['name']:<20}  {row['keys']:>4}  {'yes' if row['enabled'] else 'no':<7}"
            f"  {row['requests']:>8}  {today:>20}  {month:>20}  {_when(row['last_used_at']):<20}  {limits}"
        )


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.command not in ("serve", "proxy", "ui"):
        audit.set_actor(audit.Actor(audit.CLI))  # every change this command makes is the CLI's, in the audit log
    try:
        settings = settings_from(args)
        prepare_storage(settings)
        if args.command == "serve":
            return serve(args, settings, argv)
        if args.command == "proxy":
            return run_proxy(settings, args.web)
        if args.command == "ui":
            return run_ui(settings)
        commands = {
            "keys": keys_command,
            "upstreams": upstreams_command,
            "groups": groups_command,
            "models": models_command,
            "clients": clients_command,
            "admin": admin_command,
        }
        return commands[args.command](args, settings)
    except ConfigError as e:
        print(f"keyrotor: {e}", file=sys.stderr)
        return 2
    except routes.NotFound as e:
        print(f"keyrotor: {e}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:
        print(f"keyrotor: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
