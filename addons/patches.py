"""keyrotor's replacements of mitmproxy internals: the one list of them, and the one function installing them.

mitmproxy has no hook for what these change (docs/mitmproxy-patches.md says why each exists
and what to do when mitmproxy is upgraded). Each patch lives beside the addon whose state it
shares, as that module's `install()`; this module installs them all, in the order they need,
once per process, and only on a mitmproxy release they were checked against: they replace or
wrap code that mitmproxy may change in any release without notice, and what breaks then is
quiet (a pooled key shown in mitmweb, a 502 where a retry had succeeded), so an unchecked
release is refused rather than warned about. requirements.txt pins the same range.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

from mitmproxy.version import VERSION

from addons.bounds import install as install_bounds
from addons.credential_sender import install as install_credential_sender
from addons.listener import install as install_listener
from addons.recovery import install as install_recovery
from addons.retry_stream import install as install_retry_stream
from addons.upstream_watch import install as install_upstream_watch

log = logging.getLogger(__name__)

# The mitmproxy releases every patch below was checked against, as pip writes it; requirements.txt
# carries the same specifier (tests/addons/test_patches.py compares them). Widen both together,
# and only after re-checking each patch.
MITMPROXY_CHECKED = ">=12.2,<12.4"

# What "checked" meant for the range above: read against mitmproxy's source, and the suite run.
_CHECKED = (
    "12.2.0 to 12.3.1: mitmproxy/proxy/layers/http/__init__.py, which defines all it replaces, is the same"
    " file in each; the suite ran on 12.3.1"
)


@dataclass(frozen=True)
class Patch:
    name: str  # the addons/ module it lives in
    # Attributes of mitmproxy.proxy.layers.http it sets (replaced or wrapped); `_http1.…` of its submodules;
    # a full dotted name (mitmproxy.proxy.mode_servers.…) elsewhere in mitmproxy.
    replaces: tuple[str, ...]
    why: str
    checked: str  # the mitmproxy releases it was checked against, and how
    install: Callable[[], None]


# In the order they are installed.
PATCHES = (
    Patch(
        "recovery",
        ("HttpStream.handle_protocol_error", "_http1.make_error_response", "_http2.Http2Server._handle_event"),
        "mitmproxy answers a failed exchange (refused, reset, cut short) with its own 502 once the error"
        " hooks return. The key pool retries in its error hook; this sends the retried response instead"
        " (what mitmproxy PR #7999 proposes). It repeats the rest of mitmproxy's own handling. Where"
        " mitmproxy answers itself (malformed request, unreachable or timed-out upstream), its HTML page"
        " becomes OpenAI-shaped JSON with the same status, on HTTP/1 and HTTP/2.",
        _CHECKED,
        install_recovery,
    ),
    Patch(
        "bounds",
        ("HttpStream.state_wait_for_request_headers", "HttpStream.state_consume_request_body"),
        "mitmproxy reads a request's whole body into memory before the request hook, even when an addon"
        " answered at requestheaders. These send such an answer at once and read the rest of the body only"
        " to drop it (up to proxy.max_body_bytes, then the connection closes), and stop buffering a body"
        " without Content-Length that outgrows the limit.",
        _CHECKED,
        install_bounds,
    ),
    Patch(
        "credential_sender",
        ("HttpStream._handle_event",),
        "mitmweb serialises the live flow after every hook and serves it, so a key in flow.request would be"
        " shown. This puts the pooled key into the request's head only for the synchronous pass in which"
        " the server connection turns it into bytes, and turns the key's echo in upstream's answer into the"
        " placeholder before any hook sees it.",
        _CHECKED,
        install_credential_sender,
    ),
    Patch(
        "upstream_watch",
        ("HttpStream._handle_event", "HttpLayer._handle_event", "HttpStream.start_response_stream"),
        "mitmproxy waits for an upstream as long as its connection is open, and sends a streamed answer's"
        " headers at once. These time out a silent exchange (an injected event, routed to the flow's own"
        " stream: mitmproxy routes injected messages on HTTP/1 only), hold a stream's headers until its"
        " first byte so that a stream failing before it can still be retried, and end a stream broken after"
        " bytes reached the client with an SSE error event. Wraps the credential sender's _handle_event, so"
        " it is installed after it and sees each event first.",
        _CHECKED,
        install_upstream_watch,
    ),
    Patch(
        "retry_stream",
        ("HttpStream._handle_event", "HttpLayer._handle_event", "HttpStream.send_response"),
        "mitmproxy cannot stream an answer an addon fetched itself, so a retried stream reached the client"
        " whole. These feed a retried event stream (read by httpx) through the flow's own stream as it"
        " arrives: its head and chunks take the same path as a first attempt's (hooks, echo filter, held"
        " headers, SSE error on a break), injected like the upstream watch's timeouts; and an answer that may"
        " be retried goes through the key pool's `keyrotor_answered` hook before any `response` hook. Wraps"
        " the upstream watch's _handle_event methods, so it is installed after it and sees each event first.",
        _CHECKED,
        install_retry_stream,
    ),
    Patch(
        "listener",
        ("mitmproxy.proxy.mode_servers.AsyncioServerInstance.listen",),
        "mitmproxy opens its TCP listener without SO_REUSEPORT, so a second process cannot bind the proxy port."
        " With proxy.workers above 1 this opens each worker's listener with reuse_port=True (mitmproxy's own"
        " TCP path otherwise unchanged), and Linux spreads new connections over the workers. One process"
        " listens exactly as mitmproxy does.",
        "12.3.1, read: mitmproxy/proxy/mode_servers.py's AsyncioServerInstance.listen opens TCP with"
        " asyncio.start_server(self.handle_stream, host, port) (tests/addons/test_patches.py checks that call);"
        " the workers suite ran on 12.3.1",
        install_listener,
    ),
)


class UncheckedMitmproxy(SystemExit):
    """The refusal: a SystemExit, so that mitmdump stops with the sentence rather than a traceback."""


def _release(version: str) -> tuple[int, ...]:
    """12.3.1 → (12, 3, 1); a pre-release or development build counts as its release (13.0.0.dev → 13.0.0)."""
    numbers = re.match(r"\d+(?:\.\d+)*", version.strip())
    return tuple(int(n) for n in numbers.group().split(".")) if numbers else ()


def _checked_range(specifier: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    match = re.fullmatch(r">=([\d.]+),<([\d.]+)", specifier.replace(" ", ""))
    if match is None:
        raise ValueError(f"MITMPROXY_CHECKED reads >=A.B,<C.D, not {specifier!r}")
    return _release(match[1]), _release(match[2])


def check_version(version: str) -> None:
    """Refuses a mitmproxy release outside MITMPROXY_CHECKED, saying what to do."""
    lowest, below = _checked_range(MITMPROXY_CHECKED)
    if lowest <= _release(version) < below:
        return
    raise UncheckedMitmproxy(
        f"keyrotor: mitmproxy {version} is installed, but keyrotor's patches of mitmproxy's internals were"
        f" checked against mitmproxy{MITMPROXY_CHECKED} only: install that (pip install -r requirements.txt),"
        " or re-check each patch as docs/mitmproxy-patches.md says and widen the range."
    )


_installed = False


def install() -> None:
    """Every patch, in PATCHES' order, once per process (the -s script may be loaded again)."""
    global _installed
    if _installed:
        return
    check_version(VERSION)
    for patch in PATCHES:
        patch.install()
    _installed = True
    log.debug("mitmproxy %s patched: %s", VERSION, ", ".join(patch.name for patch in PATCHES))
