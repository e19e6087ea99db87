"""The proxy process `run.py proxy` and `serve` start: mitmproxy with only the built-ins keyrotor needs.

mitmdump runs every built-in addon mitmproxy ships (31, plus its console printer, stdin reader
and keep-serving), and mitmproxy dispatches each event of each flow to each of them whether or
not it implements the hook. keyrotor's proxy is a reverse proxy in front of one upstream, so it
runs these (docs/process.md says the same for users):

- core.Core: validates the options (listen address, mode) and the `set` command;
- disable_h2c.DisableH2C: drops h2c upgrades and prior-knowledge requests a reverse proxy must not
  forward as they are;
- proxyserver.Proxyserver: the listener and the connections;
- keyrotor's concerns, behind one dispatcher (addons/chain.py);
- next_layer.NextLayer: picks the protocol layers of a connection (HTTP/1, HTTP/2, TLS, WebSocket);
- tlsconfig.TlsConfig: TLS to an https upstream (and to clients, were TLS listening asked for);
- dumper.Dumper, only with --verbose: mitmdump's per-flow console lines;
- errorcheck.ErrorCheck: an error logged while starting (a port taken) ends the process with 1.

`--web` runs mitmweb's master unchanged, with every built-in. `mitmdump -s addons/keyrotor.py`
inside a user's own mitmproxy loads the concerns as a script, one addon each, as before.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from mitmproxy import master, options
from mitmproxy.addons import core, disable_h2c, dumper, errorcheck, next_layer, proxyserver, tlsconfig
from mitmproxy.tools import main


class ProxyMaster(master.Master):
    """mitmproxy's master with the built-ins above and keyrotor's concerns in one Chain."""

    verbose = False  # ProxyMaster.with_verbose() sets it: mitmproxy makes the master from its class

    def __init__(self, opts: options.Options) -> None:
        super().__init__(opts, with_termlog=True)
        from addons import keyrotor  # builds the concerns and installs the patches, as -s does
        from addons.chain import Chain

        self.addons.add(core.Core(), disable_h2c.DisableH2C(), proxyserver.Proxyserver())
        self.addons.add(Chain(keyrotor.addons), next_layer.NextLayer(), tlsconfig.TlsConfig())
        if self.verbose:
            self.addons.add(dumper.Dumper())
        self.addons.add(errorcheck.ErrorCheck())

    @classmethod
    def with_verbose(cls, verbose: bool) -> type[ProxyMaster]:
        return type("VerboseProxyMaster", (cls,), {"verbose": True}) if verbose else cls


def make_parser(opts: options.Options) -> argparse.ArgumentParser:
    """The options cli/serve.py passes: mode, listen address, and --set for the rest."""
    parser = argparse.ArgumentParser(prog="run.py proxy")
    opts.make_parser(parser, "mode", short="m")
    opts.make_parser(parser, "listen_host")
    opts.make_parser(parser, "listen_port", short="p")
    parser.add_argument("--set", type=str, dest="setoptions", default=[], action="append", metavar="option[=value]")
    # What mitmproxy's runner reads from mitmdump's own parser.
    parser.set_defaults(version=False, quiet=False, options=False, commands=False, verbose=False)
    return parser


def run(argv: Sequence[str], verbose: bool) -> None:
    """Run the proxy until it is stopped (SIGINT, SIGTERM), with mitmproxy's own runner."""
    main.run(ProxyMaster.with_verbose(verbose), make_parser, argv)
