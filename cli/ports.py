"""The ports keyrotor listens on, tried before a server starts: one that is taken stops the start with
a sentence naming the setting and the flag that change it (not mitmproxy's or uvicorn's own advice,
which names their flags: `--mode …@PORT`, `--set web_port=…`)."""

from __future__ import annotations

import errno
import logging
import socket
from dataclasses import dataclass

from config import Settings


@dataclass(frozen=True)
class Listener:
    what: str  # as a user names the server
    port_setting: str  # section.key
    host_setting: str
    flag: str  # the command-line way to change the port


PROXY = Listener("the proxy", "proxy.port", "proxy.host", "--proxy-port PORT")
UI = Listener("the UI", "ui.port", "ui.host", "--ui-port PORT")
MITMWEB = Listener("mitmweb", "proxy.web_port", "ui.host", "--set proxy.web_port=PORT")


class PortUnavailable(OSError):
    """A port keyrotor should listen on cannot be had; str() is the sentence to show."""


def unavailable(listener: Listener, settings: Settings, error: OSError) -> PortUnavailable:
    """The sentence for `error`, met listening for `listener`."""
    section, _, key = listener.port_setting.partition(".")
    port, host = settings[listener.port_setting], settings[listener.host_setting]
    config = settings.config_path.name if settings.config_path else "config.toml"
    change = (
        f"set [{section}] {key} in {config}, or pass {listener.flag} (or KEYROTOR_{section.upper()}_{key.upper()}=PORT)"
    )
    if error.errno == errno.EADDRINUSE:
        return PortUnavailable(
            f"port {port} is in use ({listener.what} cannot listen on {host or '*'}:{port}; another program, or"
            f" another keyrotor, has it): {change}."
        )
    reason = (error.strerror or str(error)).lower()
    host_section, _, host_key = listener.host_setting.partition(".")
    return PortUnavailable(
        f"{listener.what} cannot listen on {host or '*'}:{port} ({reason}): set [{host_section}] {host_key} to an"
        f" address of this machine, or {change}."
    )


def bound(listener: Listener, settings: Settings) -> list[socket.socket]:
    """Sockets bound (not yet listening) to every address the listener's host names; PortUnavailable if one
    cannot be. Bound as asyncio and uvicorn bind them (SO_REUSEADDR), so a port whose last connections are
    still closing (TIME_WAIT) is no false alarm."""
    host, port = settings[listener.host_setting], settings[listener.port_setting]
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as e:
        raise unavailable(listener, settings, e) from None
    sockets = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(addresses):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as asyncio's own listeners
            sock.bind(address)
    except OSError as e:
        for sock in sockets:
            sock.close()
        raise unavailable(listener, settings, e) from None
    return sockets


def check(settings: Settings, *listeners: Listener) -> None:
    """Stop now, with keyrotor's sentence, if any of these listeners' ports cannot be had (or two share one)."""
    by_port: dict[int, Listener] = {}
    for listener in listeners:
        port = settings[listener.port_setting]
        other = by_port.setdefault(port, listener)
        if other is not listener:
            section, _, key = listener.port_setting.partition(".")
            raise PortUnavailable(
                f"{other.what} and {listener.what} are both set to port {port}: set [{section}] {key} in"
                f" {settings.config_path.name if settings.config_path else 'config.toml'} to another port,"
                f" or pass {listener.flag}."
            )
    for listener in listeners:
        for sock in bound(listener, settings):
            sock.close()


class ListenFailure(logging.Filter):
    """A server's own report that its port is taken (taken between check() and its start), rewritten into
    keyrotor's sentence. Installed on the logger that reports it (mitmproxy's proxyserver, uvicorn's)."""

    def __init__(self, listener: Listener, settings: Settings) -> None:
        super().__init__()
        self.listener, self.settings = listener, settings

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "address already in use" in text.lower() or f"errno {errno.EADDRINUSE}]" in text.lower():
            error = OSError(errno.EADDRINUSE, text.splitlines()[0])
            record.msg, record.args = f"keyrotor: {unavailable(self.listener, self.settings, error)}", None
        return True
