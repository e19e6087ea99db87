"""What the servers print: by default one line per start, stop, state change (a key turning invalid,
exhausted, cooling or active again; a group left without a usable key) and error, never lines per
request; `--verbose` brings the per-request lines back (mitmdump's per-flow lines, connections,
keyrotor's own per-request lines, the UI's access log).

Every request is in the flows table and the UI already: the console is for what a person must notice.
"""

from __future__ import annotations

import asyncio
import logging

# Loggers whose INFO lines are per request or per connection; raised to WARNING unless --verbose.
PER_REQUEST = (
    "mitmproxy.proxy.server",  # client connect / disconnect, server connect / disconnect
    "mitmproxy.addons.script",  # "Loading script …": the proxy's own start line says it is up
    "httpx",  # "HTTP Request: POST …" for each retry keyrotor sends itself
    "keyrotor.requests",  # keyrotor's lines about one request (timeouts, refusals, closed sessions)
)


def proxy_argv(verbose: bool) -> list[str]:
    """mitmdump's options for the console: its per-flow lines only with --verbose."""
    return [] if verbose else ["--set", "flow_detail=0"]


def quiet(verbose: bool) -> None:
    """Before the proxy or the UI starts, in its process."""
    if not verbose:
        for name in PER_REQUEST:
            logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("asyncio").addFilter(_cancelled_at_stop)


def _cancelled_at_stop(record: logging.LogRecord) -> bool:
    """asyncio's "Exception in callback …" with a whole traceback for a connection task cancelled as the
    proxy stops (mitmproxy 12.3 asks the cancelled task for its exception): the stop's own line says it."""
    exc = record.exc_info[1] if record.exc_info else None
    return not isinstance(exc, asyncio.CancelledError)


class UvicornLines(logging.Filter):
    """uvicorn's four lines per start and stop, as one each (its errors pass as they are)."""

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.INFO:
            return True
        text = record.getMessage()
        if text.startswith("Uvicorn running on"):
            record.msg, record.args = f"keyrotor UI listening at {self.url}", None
            return True
        if text.startswith("Finished server process"):
            record.msg, record.args = "keyrotor UI stopped", None
            return True
        return False
