"""The command line's grammar: every command, flag and help text of run.py."""

from __future__ import annotations

import argparse
from pathlib import Path

from core.routing import Dialect

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
VERBOSE = "print a line per request and connection too (by default: starts, stops, state changes and errors)"
DESCRIPTION = "keyrotor's command line: start the proxy and the UI, manage upstream and client keys."


def build_parser() -> argparse.ArgumentParser:
    """run.py's parser: every command and flag (tests/test_docs.py checks each is documented)."""
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

    parser = argparse.ArgumentParser(prog="run.py", description=DESCRIPTION, parents=[common])
    commands = parser.add_subparsers(dest="command")
    for name, text in (("serve", "proxy and UI together"), ("proxy", "the proxy only")):
        sub = commands.add_parser(name, parents=[common], help=f"start {text}")
        sub.add_argument("--web", action="store_true", help="run mitmweb (flow inspector, admin key as password)")
        sub.add_argument("--verbose", action="store_true", help=VERBOSE)
        sub.add_argument("--workers", metavar="N", help='same as --set proxy.workers=N (a number, or "auto")')
        # Set by the supervisor (cli/workers.py) on the processes it starts: which worker this one is.
        sub.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    ui = commands.add_parser("ui", parents=[common], help="start the monitor UI only")
    ui.add_argument("--verbose", action="store_true", help=VERBOSE)
    commands.add_parser(
        "demo",
        parents=[common],
        help="try keyrotor without an API key: proxy and UI in front of a local fake upstream,"
        " on a throwaway database, with a demo client key and a little traffic",
    )

    keys = commands.add_parser("keys", parents=[common], help="manage upstream keys").add_subparsers(
        dest="action", required=True
    )
    add = keys.add_parser(
        "add",
        parents=[common],
        help='add keys, one per line (KEY, NAME<TAB>KEY, or a .env line: VAR=KEY, export VAR="KEY"),'
        " from files or standard input",
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
        sub.add_argument(
            "--legacy-objects",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="may reach files, batches... that no client made through keyrotor (made upstream directly,"
            " or before clients owned objects); off by default",
        )
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

    storage_commands = commands.add_parser("storage", parents=[common], help="the capture database").add_subparsers(
        dest="action", required=True
    )
    storage_commands.add_parser("stats", parents=[common], help="flows, bytes per flow by part, retention outlook")
    storage_commands.add_parser(
        "migrate", parents=[common], help="convert flows stored before compression now (safe beside a running proxy)"
    )
    copy = storage_commands.add_parser(
        "copy",
        parents=[common],
        help="copy storage.path's SQLite database into PostgreSQL, keys still encrypted; run again to resume",
    )
    copy.add_argument(
        "--to",
        metavar="URL",
        help="postgresql://USER@HOST:PORT/DB (default: storage.url); the password from PGPASSWORD or ~/.pgpass",
    )

    flows_commands = commands.add_parser(
        "flows", parents=[common], help="send recorded flows again, compare two (docs/workbench.md)"
    ).add_subparsers(dest="action", required=True)
    replay = flows_commands.add_parser(
        "replay", parents=[common], help="send flow ID again through the running proxy, under its client"
    )
    replay.add_argument("flow_id", type=int, metavar="ID")
    replay.add_argument("--group", metavar="UPSTREAM/GROUP", help="only this group serves it")
    replay.add_argument("--key", type=int, metavar="KEY_ID", help="only this upstream key serves it")
    replay.add_argument("--model", metavar="MODEL", help="ask for this model instead")
    replay.add_argument("--client", metavar="NAME", help="run as this client (default: the flow's)")
    compare = flows_commands.add_parser("compare", parents=[common], help="two flows side by side, text word by word")
    compare.add_argument("a", type=int, metavar="A")
    compare.add_argument("b", type=int, metavar="B")
    compare.add_argument("--json", action="store_true", help="the comparison as GET /api/flows/compare answers it")
    traces = commands.add_parser("traces", parents=[common], help="trace probes: who fetches what a relay receives")
    trace_actions = traces.add_subparsers(dest="action", required=True)
    trace_run = trace_actions.add_parser("run", parents=[common], help="run a trace through a group; print its verdict")
    trace_run.add_argument("label", metavar="UPSTREAM/GROUP")
    trace_run.add_argument("model", metavar="MODEL")
    trace_list = trace_actions.add_parser("list", parents=[common], help="traces, newest first, with their verdicts")
    trace_list.add_argument("--group", metavar="UPSTREAM/GROUP", help="only this group's traces")
    trace_list.add_argument("--model", metavar="MODEL", help="only this model's traces")
    playground = commands.add_parser(
        "playground", parents=[common], help="ask a model through the proxy, as the UI's playground does"
    ).add_subparsers(dest="action", required=True)
    ask = playground.add_parser(
        "ask",
        parents=[common],
        help="send a prompt (streamed as it arrives); a new conversation unless --conversation names one",
    )
    ask.add_argument("model", metavar="MODEL")
    ask.add_argument("prompt", metavar="PROMPT")
    ask.add_argument("--group", metavar="UPSTREAM/GROUP", help="only this group serves it (default: routed)")
    ask.add_argument("--client", metavar="NAME", help="run as this client (default: the built-in playground client)")
    ask.add_argument("--conversation", metavar="ID", help="continue this conversation (its earlier turns are sent)")
    ask.add_argument("--system", metavar="TEXT", help="system prompt (default: the conversation's)")
    ask.add_argument("--temperature", type=float, metavar="X")
    ask.add_argument("--max-tokens", type=int, metavar="N")
    ask.add_argument("--no-stream", dest="stream", action="store_false", help="ask for the whole answer at once")
    playground.add_parser("list", parents=[common], help="the conversations kept, newest first")
    for action, text in (
        ("show", "a conversation's turns, with their flows"),
        ("delete", "delete a conversation (its flows stay)"),
    ):
        playground.add_parser(action, parents=[common], help=text).add_argument("conversation_id", metavar="ID")

    alerts = commands.add_parser("alerts", parents=[common], help="alerts and their webhook").add_subparsers(
        dest="action", required=True
    )
    alerts.add_parser("test", parents=[common], help="send a test alert to [alerts] webhook_url now")
    alerts.add_parser("list", parents=[common], help="the alerts that hold now, and the latest ones raised")

    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The parsed command line; `args.argv` keeps it as given (serve passes it on to its children)."""
    args = build_parser().parse_args(argv)
    args.command = args.command or "serve"
    args.argv = list(argv)
    # Not parser.set_defaults(): `parents=` shares action objects, so that would change the
    # subcommands' defaults too and bring the overwriting back.
    for name, default in (
        ("web", False),
        ("workers", None),
        ("worker_index", None),
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
