"""Stopping without cutting anyone off: SIGTERM and Ctrl-C let requests in flight finish.

mitmproxy's own handlers stop the event loop at once, so every request in flight was cut
and the capture of the ones about to finish was lost. This addon replaces them once the
proxy runs: the first signal closes the listener (no new connections), waits up to
`proxy_stop_grace_seconds` for the requests in flight to end, then shuts mitmproxy down,
whose `done` hooks flush the capture writer. A second Ctrl-C stops at once. The option
mirrors the setting proxy.stop_grace_seconds.

A request that arrives on a connection opened before the signal is served too, with
`connection: close`: at saturation the proxy has not yet read requests that clients sent
before the signal, and it cannot tell them from later ones. Each connection carries at
most one more request that way, and a client's next one finds the listener closed.

It must come last among keyrotor's addons: a flow counts as finished when its `response`
or `error` hook has run in every addon before this one (the key pool may still be
retrying in its own), and mitmproxy sends the rest of the response right after the last
hook returns, without yielding to the event loop in between.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from mitmproxy import ctx, exceptions, http
from mitmproxy.addonmanager import Loader

from config import ConfigError, Settings, checked_options, default_of

log = logging.getLogger(__name__)

POLL_SECONDS = 0.05
PRUNE_AT = 10_000  # flows that ended without either hook (none should) are forgotten past this many


class Shutdown:
    def __init__(self, defaults: Settings | None = None) -> None:
        self._defaults = defaults
        self._in_flight: dict[str, http.HTTPFlow] = {}
        self._draining = False
        self._drain: asyncio.Task | None = None

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "proxy_stop_grace_seconds",
            int,
            default_of(self._defaults, "proxy.stop_grace_seconds"),
            "On SIGTERM or Ctrl-C, how long requests in flight may take to finish before they are cut.",
        )

    def configure(self, updated: set[str]) -> None:
        try:
            checked_options(ctx.options, updated, ["proxy.stop_grace_seconds"])
        except ConfigError as e:
            raise exceptions.OptionsError(str(e)) from None

    def running(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self._signalled, signum)
        except NotImplementedError:  # Windows' event loop: mitmproxy's immediate stop stays
            pass

    def _signalled(self, signum: int) -> None:
        if self._draining:
            if signum == signal.SIGINT:  # a second Ctrl-C; a SIGTERM now is `run.py serve` passing one on
                log.warning("stopping now: %d requests in flight are cut", len(self._in_flight))
                ctx.master.shutdown()
            return
        self._draining = True
        self._drain = asyncio.create_task(self._stop_when_idle(ctx.options.proxy_stop_grace_seconds))

    async def _stop_when_idle(self, grace: float) -> None:
        ctx.options.update(server=False)  # closes the listener; open connections carry on
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        if self._in_flight:
            log.info("stopping: waiting up to %g s for %d requests in flight", grace, len(self._in_flight))
        while (self._in_flight or unsent_bytes() > 0) and loop.time() < deadline:
            await asyncio.sleep(POLL_SECONDS)
        if self._in_flight:
            log.warning(
                "stopping: %d requests still in flight after %g s (proxy.stop_grace_seconds) are cut",
                len(self._in_flight),
                grace,
            )
        ctx.master.shutdown()

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if len(self._in_flight) >= PRUNE_AT:
            self._in_flight = {k: f for k, f in self._in_flight.items() if f.live}
        self._in_flight[flow.id] = flow

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if self._draining and flow.response is not None:
            flow.response.headers["connection"] = "close"  # before a stream's headers go out

    def response(self, flow: http.HTTPFlow) -> None:
        if self._draining and flow.response is not None:
            # Whole responses (and answers made by an addon) go out after this hook; after a
            # stream, mitmproxy reads it when the end has been sent, and closes then.
            flow.response.headers["connection"] = "close"
        self._in_flight.pop(flow.id, None)

    def error(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        if flow.error is None and response is not None and response.raw_content is None:
            return  # recovered with a retried stream, fed to the client next: in flight until its end
        self._in_flight.pop(flow.id, None)


def unsent_bytes() -> int:
    """Bytes the proxy has written to its clients' sockets that the kernel has not taken yet.

    A client that reads slowly can leave the end of a response in a transport's buffer
    after its flow has finished; shutting down then would drop it. mitmproxy offers no
    public view of this, so it is read defensively from its proxy server's connections.
    """
    proxyserver = ctx.master.addons.get("proxyserver")
    total = 0
    try:
        for handler in list(proxyserver.connections.values()):
            for io in list(handler.transports.values()):
                transport = getattr(io.writer, "transport", None)
                if transport is not None and not transport.is_closing():
                    total += transport.get_write_buffer_size()
    except (AttributeError, TypeError):
        return 0
    return total
