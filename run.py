"""keyrotor's command line: start the proxy and the UI, manage upstream and client keys.

    run.py [serve] [--web]        proxy (mitmdump, or mitmweb with --web) and UI, stopped together
    run.py proxy [--web] | ui     one of them
    run.py keys add|list|rename|enable|disable|delete|reset|validate|weight ...
    run.py clients add|set NAME [limits] | keys NAME add|list|revoke KEY_ID | list | enable|disable NAME
    run.py traces run UPSTREAM/GROUP MODEL | list [--group G] [--model M]   trace probes
    run.py admin rotate           a new admin key (shown once); every UI session ends

Every command takes --config PATH and --set section.key=value (repeatable).
The commands live in cli/: one module per command group, the parser in cli/parser.py.
"""

from __future__ import annotations

import sys

if sys.version_info < (3, 12):  # noqa: UP036 - run.py may be started by an older python3
    sys.exit(
        "keyrotor needs Python 3.12+ (mitmproxy 12). Run it with the virtual environment"
        " that ./start.sh creates: .venv/bin/python run.py ..."
    )


def main(argv: list[str]) -> int:
    # Imported here, after the version check: cli/ and what it imports need Python 3.12.
    from cli.main import main as run_command

    return run_command(argv)


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:  # Ctrl-C before a command set its own handling (while importing): no traceback
        sys.exit(130)
