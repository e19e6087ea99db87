"""The patches of mitmproxy's internals: what they replace still exists upstream, they go in once, in order.

These fail first when mitmproxy is upgraded past what the patches were checked against: read
docs/mitmproxy-patches.md before widening MITMPROXY_CHECKED.
"""

from __future__ import annotations

import ast
import asyncio
import importlib
import inspect
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.proxy import commands, events, mode_servers
from mitmproxy.proxy.layers import http as http_layer
from mitmproxy.test import taddons
from mitmproxy.version import VERSION

from addons import bounds, credential_sender, listener, patches, recovery, retry_stream, upstream_watch
from addons.runtime import Runtime
from config import ROOT

# The parameters each replaced or wrapped method is called with: the patches take the same.
REPLACED = {
    "HttpStream.handle_protocol_error": ("self", "event"),
    "HttpStream.state_wait_for_request_headers": ("self", "event"),
    "HttpStream.state_consume_request_body": ("self", "event"),
    "HttpStream._handle_event": ("self", "event"),
    "HttpStream.start_response_stream": ("self",),
    "HttpStream.send_response": ("self", "already_streamed"),
    "HttpLayer._handle_event": ("self", "event"),
    "_http1.make_error_response": ("status_code", "message"),
    "_http2.Http2Server._handle_event": ("self", "event"),
    "mitmproxy.proxy.mode_servers.AsyncioServerInstance.listen": ("self", "host", "port"),
}

# What the patches call or read on the classes they patch (None: any parameters).
CALLED = {
    "HttpStream.check_killed": ("self", "emit_error_hook"),
    "HttpStream.passthrough": ("self", "event"),
    "HttpStream.state_errored": None,
    "HttpStream.state_done": None,
    "HttpStream.state_stream_request_body": None,
    "HttpStream.state_wait_for_response_headers": None,
    "HttpStream.state_consume_response_body": None,
    "HttpStream.state_stream_response_body": None,
    "HttpLayer.event_to_child": ("self", "child", "event"),
}
ATTRIBUTES = {
    "HttpStream": ("flow", "stream_id", "request_body_buf", "response_body_buf", "client_state", "server_state"),
    "HttpLayer": ("streams",),
}

# What the patches build or test events against, by the parameters they pass (leading ones).
BUILT = [
    (http_layer.RequestHeaders, ("stream_id", "request", "end_stream")),
    (http_layer.RequestData, ("stream_id", "data")),
    (http_layer.RequestEndOfMessage, ("stream_id",)),
    (http_layer.ResponseHeaders, ("stream_id", "response", "end_stream")),
    (http_layer.ResponseData, ("stream_id", "data")),
    (http_layer.ResponseEndOfMessage, ("stream_id",)),
    (http_layer.ResponseTrailers, ("stream_id", "trailers")),
    (http_layer.ResponseProtocolError, ("stream_id", "message", "code")),
    (http_layer.SendHttp, ("event", "connection")),
    (http_layer.DropStream, ("stream_id",)),
    (http_layer.HttpErrorHook, ("flow",)),
    (http_layer.HttpResponseHeadersHook, ("flow",)),
    (retry_stream.KeyrotorAnsweredHook, ("flow",)),
    (events.MessageInjected, ("flow", "message")),
    (commands.CloseConnection, ("connection",)),
    (Proxyserver.inject_event, ("self", "event")),
]


def mitmproxys_classes() -> dict[str, ast.ClassDef]:
    """HttpStream and HttpLayer as mitmproxy's own source defines them, whatever is patched in this process."""
    tree = ast.parse(Path(inspect.getsourcefile(http_layer)).read_text())
    return {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}


def method(name: str) -> ast.FunctionDef | None:
    """`Class.method` of mitmproxy.proxy.layers.http, or `_module.function` / `_module.Class.method` of its submodules,
    or `mitmproxy.module.Class.method` elsewhere in mitmproxy."""
    if name.startswith("mitmproxy."):
        module_name, owner, attribute = name.rsplit(".", 2)
        source = Path(inspect.getsourcefile(importlib.import_module(module_name))).read_text()
        found = {node.name: node for node in ast.parse(source).body if isinstance(node, ast.ClassDef)}
        for node in found[owner].body if owner in found else []:
            if isinstance(node, ast.AsyncFunctionDef | ast.FunctionDef) and node.name == attribute:
                return node  # type: ignore[return-value]
        return None
    if name.startswith("_"):
        module, _, name = name.partition(".")
        source = Path(inspect.getsourcefile(http_layer)).with_name(f"{module}.py").read_text()
        tree: list[ast.stmt] = ast.parse(source).body
        if "." not in name:
            functions = [node for node in tree if isinstance(node, ast.FunctionDef) and node.name == name]
            return functions[0] if functions else None
        classes = {node.name: node for node in tree if isinstance(node, ast.ClassDef)}
    else:
        classes = mitmproxys_classes()
    owner, attribute = name.split(".")
    for node in classes[owner].body:
        if isinstance(node, ast.FunctionDef) and node.name == attribute:
            return node
    return None


def parameters(function: ast.FunctionDef) -> tuple[str, ...]:
    return tuple(a.arg for a in function.args.posonlyargs + function.args.args)


def test_each_patch_declares_what_it_replaces_here():
    replaced = {name for patch in patches.PATCHES for name in patch.replaces}
    assert replaced == set(REPLACED), "a new patch: add what it replaces, and its parameters, to REPLACED"


@pytest.mark.parametrize("name", sorted(REPLACED))
def test_what_a_patch_replaces_still_exists_in_mitmproxy(name):
    function = method(name)
    assert function is not None, f"mitmproxy no longer defines {name}: re-check the patch replacing it"
    assert parameters(function) == REPLACED[name], f"{name} changed its parameters"


@pytest.mark.parametrize("name", sorted(CALLED))
def test_what_the_patches_call_still_exists_in_mitmproxy(name):
    function = method(name)
    assert function is not None, f"mitmproxy no longer defines {name}, which a patch calls"
    if CALLED[name] is not None:
        assert parameters(function) == CALLED[name], f"{name} changed its parameters"


@pytest.mark.parametrize("owner", sorted(ATTRIBUTES))
def test_what_the_patches_read_is_still_set_by_mitmproxy(owner):
    cls = mitmproxys_classes()[owner]
    annotated = {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    assigned = {
        target.attr
        for node in ast.walk(cls)
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self"
    }
    missing = set(ATTRIBUTES[owner]) - annotated - assigned
    assert not missing, f"mitmproxy's {owner} no longer has {sorted(missing)}"


@pytest.mark.parametrize("built, leading", BUILT, ids=[built.__qualname__ for built, _ in BUILT])
def test_what_the_patches_build_takes_the_same_parameters(built, leading):
    names = tuple(inspect.signature(built).parameters)
    assert names[: len(leading)] == leading, f"{built.__qualname__}{inspect.signature(built)}"


def test_the_tcp_listener_the_workers_patch_repeats_is_mitmproxys():
    # listener.py opens TCP as mitmproxy's own listen does, adding reuse_port: the same call must be there.
    function = method("mitmproxy.proxy.mode_servers.AsyncioServerInstance.listen")
    assert function is not None
    assert "asyncio.start_server(self.handle_stream, host, port)" in ast.unparse(function)
    assert "self.mode.transport_protocol" in ast.unparse(function)


@pytest.mark.parametrize("workers, shared", [(1, False), (2, True)])
def test_workers_listen_on_one_port_and_one_process_as_mitmproxy_does(workers: int, shared: bool):
    class Mode:
        transport_protocol = "tcp"

    class Instance:  # what the patched listen uses of mitmproxy's server instance
        mode = Mode()

        async def handle_stream(self, reader, writer) -> None:
            writer.close()

    async def listen_twice() -> bool:
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        first = await listener._listen(Instance(), "127.0.0.1", port)  # type: ignore[arg-type]
        try:
            second = await listener._listen(Instance(), "127.0.0.1", port)  # type: ignore[arg-type]
        except OSError:
            return False
        finally:
            for server in first:
                server.close()
        for server in second:
            server.close()
        return True

    with taddons.context(Runtime()) as tctx:
        tctx.options.update(proxy_workers=workers)
        assert asyncio.run(listen_twice()) is shared


def test_the_websocket_handover_the_upstream_watch_relies_on():
    # A stream that became a WebSocket sets _handle_event on itself: the watch skips such streams.
    source = Path(inspect.getsourcefile(http_layer)).read_text()
    assert "self._handle_event = self.passthrough" in source


# ---------------------------------------------------------------------- installed: once, in order


def is_mitmproxys(function, qualname: str) -> bool:
    return function.__module__ == http_layer.__name__ and function.__qualname__ == qualname


def installed_state() -> dict[str, object]:
    return {
        "HttpStream.handle_protocol_error": http_layer.HttpStream.handle_protocol_error,
        "HttpStream.state_wait_for_request_headers": http_layer.HttpStream.state_wait_for_request_headers,
        "HttpStream.state_consume_request_body": http_layer.HttpStream.state_consume_request_body,
        "HttpStream._handle_event": http_layer.HttpStream._handle_event,
        "HttpStream.start_response_stream": http_layer.HttpStream.start_response_stream,
        "HttpStream.send_response": http_layer.HttpStream.send_response,
        "HttpLayer._handle_event": http_layer.HttpLayer._handle_event,
        "the retry stream wraps": (retry_stream._inner_stream_event, retry_stream._inner_layer_event),
        "the retry stream sends with": retry_stream._inner_send_response,
        "the watch wraps": upstream_watch._inner_stream_event,
        "the sender wraps": credential_sender._handle_event,
        "the watch's layer wraps": upstream_watch._inner_layer_event,
        "recovery falls back to": recovery._original,
        "bounds fall back to": (bounds._wait_for_request_headers, bounds._consume_request_body),
        "listen": mode_servers.AsyncioServerInstance.listen,
        "the listener falls back to": listener._original,
    }


def test_the_entry_installed_every_patch_in_order():
    patches.install()  # the -s entry did already (tests/conftest.py imports it): nothing changes
    assert http_layer.HttpStream.handle_protocol_error is recovery._handle_protocol_error
    assert is_mitmproxys(recovery._original, "HttpStream.handle_protocol_error")
    assert http_layer.HttpStream.state_wait_for_request_headers is bounds._state_wait_for_request_headers
    assert http_layer.HttpStream.state_consume_request_body is bounds._state_consume_request_body
    assert is_mitmproxys(bounds._wait_for_request_headers, "HttpStream.state_wait_for_request_headers")
    assert is_mitmproxys(bounds._consume_request_body, "HttpStream.state_consume_request_body")
    # The retry stream sees each event first, then the watch, then the credential sender, then mitmproxy.
    assert http_layer.HttpStream._handle_event is retry_stream._stream_event
    assert retry_stream._inner_stream_event is upstream_watch._watched_stream_event
    assert upstream_watch._inner_stream_event is credential_sender._handle_event_with_key
    assert is_mitmproxys(credential_sender._handle_event, "HttpStream._handle_event")
    assert http_layer.HttpLayer._handle_event is retry_stream._layer_event
    assert retry_stream._inner_layer_event is upstream_watch._layer_event
    assert is_mitmproxys(upstream_watch._inner_layer_event, "HttpLayer._handle_event")
    assert http_layer.HttpStream.send_response is retry_stream._send_response
    assert is_mitmproxys(retry_stream._inner_send_response, "HttpStream.send_response")
    assert http_layer.HttpStream.start_response_stream is upstream_watch._start_response_stream_held
    assert mode_servers.AsyncioServerInstance.listen is listener._listen
    assert listener._original is not None and listener._original.__qualname__ == "AsyncioServerInstance.listen"


def test_the_credential_sender_goes_in_before_the_watch_that_wraps_it():
    names = [patch.name for patch in patches.PATCHES]
    assert names.index("credential_sender") < names.index("upstream_watch") < names.index("retry_stream")


def test_the_key_pools_hook_is_named_as_the_retry_stream_yields_it():
    # mitmproxy calls the addon method named after the hook: a rename would skip the retry silently.
    from addons.keypool import KeyPool

    assert retry_stream.KeyrotorAnsweredHook.name == "keyrotor_answered"
    assert callable(getattr(KeyPool, retry_stream.KeyrotorAnsweredHook.name))


def test_installing_again_changes_nothing(monkeypatch):
    before = installed_state()
    patches.install()
    monkeypatch.setattr(patches, "_installed", False)  # as if a second copy of the entry asked
    patches.install()
    for patch in patches.PATCHES:  # and each patch on its own, in any order
        patch.install()
    for patch in reversed(patches.PATCHES):
        patch.install()
    assert installed_state() == before


def test_install_runs_each_patch_once_in_the_listed_order(monkeypatch):
    ran = []
    listed = tuple(
        patches.Patch(p.name, p.replaces, p.why, p.checked, lambda name=p.name: ran.append(name))
        for p in patches.PATCHES
    )
    monkeypatch.setattr(patches, "PATCHES", listed)
    monkeypatch.setattr(patches, "_installed", False)
    patches.install()
    patches.install()
    assert ran == [p.name for p in listed]


@pytest.mark.parametrize("patched", [True, False])
def test_the_credential_sender_tells_the_key_pool_whether_its_patch_is_in(monkeypatch, patched):
    # Without the patch the key pool must put the key on the flow itself, or requests leave without one.
    monkeypatch.setattr(credential_sender, "_installed", patched)
    sender = credential_sender.CredentialSender()
    with taddons.context(sender):
        assert sender.installed is patched


def test_each_patch_says_why_and_what_it_was_checked_against():
    for patch in patches.PATCHES:
        assert patch.replaces and len(patch.why) > 40 and patch.checked, patch.name


# ---------------------------------------------------------------------- the version they were checked against


@pytest.mark.parametrize("version", ["12.2.0", "12.2.3", "12.3.0", "12.3.1"])
def test_a_checked_mitmproxy_is_accepted(version):
    patches.check_version(version)


@pytest.mark.parametrize("version", ["11.1.3", "12.1.2", "12.4.0", "12.10.1", "13.0.0", "13.0.0.dev"])
def test_an_unchecked_mitmproxy_is_refused_with_what_to_do(version):
    with pytest.raises(patches.UncheckedMitmproxy) as refused:
        patches.check_version(version)
    message = str(refused.value)
    assert message.startswith(f"keyrotor: mitmproxy {version} is installed")
    assert f"mitmproxy{patches.MITMPROXY_CHECKED}" in message
    assert "docs/mitmproxy-patches.md" in message


def test_nothing_is_patched_on_an_unchecked_mitmproxy(monkeypatch):
    ran = []
    monkeypatch.setattr(patches, "PATCHES", (patches.Patch("p", ("X.y",), "why", "checked", lambda: ran.append(1)),))
    monkeypatch.setattr(patches, "_installed", False)
    monkeypatch.setattr(patches, "VERSION", "13.0.0")
    with pytest.raises(patches.UncheckedMitmproxy):
        patches.install()
    assert ran == [] and patches._installed is False


def test_the_installed_mitmproxy_is_one_they_were_checked_against():
    patches.check_version(VERSION)


def test_requirements_pin_mitmproxy_to_the_checked_range():
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    (pin,) = [line.split("#")[0].strip() for line in lines if line.startswith("mitmproxy")]
    assert pin == f"mitmproxy{patches.MITMPROXY_CHECKED}"


def test_the_proxy_refuses_to_start_on_an_unchecked_mitmproxy():
    # The -s entry as mitmdump loads it, with mitmproxy saying it is a release nobody checked.
    script = (
        "import mitmproxy.version, runpy;"
        "mitmproxy.version.VERSION = '13.0.0';"
        f"runpy.run_path({str(ROOT / 'addons' / 'keyrotor.py')!r})"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 1
    assert done.stderr.startswith("keyrotor: mitmproxy 13.0.0 is installed"), done.stderr


def test_what_the_realtime_addon_closes_sessions_with_still_exists_in_mitmproxy():
    """addons/realtime.py closes a WebSocket itself (mitmproxy has no command for it): it reaches the
    client's writer through the proxyserver addon's connections and the handler's transports."""
    import dataclasses

    from mitmproxy.addons import proxyserver
    from mitmproxy.proxy import server

    proxyserver_source = Path(inspect.getsourcefile(proxyserver)).read_text()
    server_source = Path(inspect.getsourcefile(server)).read_text()
    assert "self.connections" in proxyserver_source
    assert "self.transports" in server_source
    assert "writer" in {field.name for field in dataclasses.fields(server.ConnectionIO)}
