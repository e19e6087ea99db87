"""The proxy's listening socket, shared by the workers of `run.py proxy --workers N` (SO_REUSEPORT).

mitmproxy opens its listener with `asyncio.start_server(handler, host, port)` and offers no
option for SO_REUSEPORT, without which a second process cannot bind the port. This patch
(installed by addons/patches.py) opens the TCP listener of a worker with `reuse_port=True`,
so that each worker has a socket of its own on the same port and Linux spreads new
connections over them by a hash of each connection's addresses and ports; a connection
stays with the worker that accepted it (a keep-alive client talks to one worker).

A single process (proxy_workers = 1, plain mitmdump) listens exactly as mitmproxy does.
The option is declared by the Runtime (addons/runtime.py), which wires what workers share.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from mitmproxy import ctx
from mitmproxy.proxy import mode_servers

_original: Callable | None = None


def shares_port() -> bool:
    """Whether this process is one of several workers on the proxy port."""
    return getattr(ctx.options, "proxy_workers", 1) > 1


async def _listen(self: mode_servers.AsyncioServerInstance, host: str, port: int) -> list:
    assert _original is not None
    if not shares_port() or self.mode.transport_protocol != "tcp" or port == 0:
        return await _original(self, host, port)
    # mitmproxy's own TCP path (AsyncioServerInstance.listen), with the port shared.
    return [await asyncio.start_server(self.handle_stream, host, port, reuse_port=True)]


def install() -> None:
    """Put the worker's listener in, once per process (addons/patches.py calls it)."""
    global _original
    if _original is not None:
        return
    _original = mode_servers.AsyncioServerInstance.listen
    mode_servers.AsyncioServerInstance.listen = _listen  # type: ignore[method-assign]
