"""The container's health check: exit 0 when what it runs answers, 1 (and one line saying why) when not.

    python deploy/healthcheck.py            checks what `run.py` runs here: serve → proxy and UI
    python deploy/healthcheck.py proxy ui   checks those

- The UI: `GET /health` answers 200 `{"status": "ok"}`.
- The proxy: every HTTP request it receives becomes a recorded flow (a 401 without a client key),
  so the check sends a request line that is no HTTP at all. keyrotor answers it itself, from its
  event loop, with 400 and `x-keyrotor-error: malformed_request`, and records nothing: a proxy
  that answers so is serving; one that accepts the connection but never answers (a stuck loop) is not.

Ports and hosts are keyrotor's own settings (config.toml, KEYROTOR_* variables), read as it reads them.
"""

from __future__ import annotations

import http.client
import json
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # config.py, when run as a script from anywhere

from config import ConfigError, Settings, load_settings  # noqa: E402

TIMEOUT = 4.0
PROBE = b"KEYROTOR-HEALTHCHECK\r\n\r\n"  # a request line mitmproxy cannot parse: no flow is made
PARTS = {"serve": ("proxy", "ui"), "proxy": ("proxy",), "ui": ("ui",)}


def _local(host: str) -> str:
    """Where to reach a listener bound to `host` from inside its own container."""
    return "127.0.0.1" if host in ("0.0.0.0", "", "*") else "::1" if host == "::" else host


def check_ui(settings: Settings) -> str | None:
    """None when the UI answers its /health; else why not."""
    connection = http.client.HTTPConnection(_local(settings.ui.host), settings.ui.port, timeout=TIMEOUT)
    try:
        connection.request("GET", "/health")
        response = connection.getresponse()
        body = response.read()
    except OSError as e:
        return f"the UI on port {settings.ui.port} does not answer: {e}"
    finally:
        connection.close()
    try:
        healthy = response.status == 200 and json.loads(body) == {"status": "ok"}
    except ValueError:
        healthy = False
    return None if healthy else f"the UI's /health answered {response.status}"


def check_proxy(settings: Settings) -> str | None:
    """None when the proxy answers a malformed request line as keyrotor does; else why not."""
    answer = b""
    try:
        with socket.create_connection((_local(settings.proxy.host), settings.proxy.port), timeout=TIMEOUT) as sock:
            sock.sendall(PROBE)
            while b"\r\n\r\n" not in answer and len(answer) < 65536:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                answer += chunk
    except OSError as e:
        if not answer:  # a server that answered, then reset the connection, is judged by its answer
            return f"the proxy on port {settings.proxy.port} does not answer: {e}"
    head = answer.partition(b"\r\n\r\n")[0].decode("latin-1").lower().split("\r\n")
    if not head[0].startswith("http/1.1 400") or "x-keyrotor-error: malformed_request" not in head[1:]:
        return f"the proxy on port {settings.proxy.port} answered {head[0]!r}, not keyrotor's 400"
    return None


def running_command(proc: Path = Path("/proc")) -> str:
    """What `run.py` was started to run in this container (its first process): serve, proxy or ui."""
    found: list[tuple[int, str]] = []
    for entry in proc.glob("[0-9]*/cmdline"):
        try:
            args = entry.read_bytes().split(b"\0")
        except OSError:
            continue  # a process that ended meanwhile
        words = [a.decode(errors="replace") for a in args if a]
        for i, word in enumerate(words):
            if word == "run.py" or word.endswith("/run.py"):
                command = next((w for w in words[i + 1 :] if w in PARTS), "serve")  # run.py alone: serve
                found.append((int(entry.parent.name), command))
                break
    return min(found)[1] if found else "serve"


def main(argv: list[str]) -> int:
    parts = argv or list(PARTS[running_command()])
    unknown = [p for p in parts if p not in ("proxy", "ui")]
    if unknown:
        print(f"healthcheck: {unknown[0]!r} is neither proxy nor ui", file=sys.stderr)
        return 2
    try:
        settings = load_settings()
    except ConfigError as e:
        print(f"unhealthy: {e}", file=sys.stderr)
        return 1
    checks = {"proxy": check_proxy, "ui": check_ui}
    problems = [p for p in (checks[part](settings) for part in parts) if p]
    if problems:
        print("unhealthy: " + "; ".join(problems), file=sys.stderr)
        return 1
    print("healthy: " + ", ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
