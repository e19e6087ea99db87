"""A real nginx with deploy/nginx.conf in front of real keyrotor nodes, as compose.yaml wires them.

No container runs here: Debian's nginx (./test.sh installs it, scripts/install_nginx.sh) is started on
free loopback ports in the test's directory. The template is rendered as the nginx image renders it,
with compose.yaml's values, each `keyrotor-N:PORT` resolved to node N's address (127.0.0.1) and the
port that node listens on for PORT. Without nginx the tests skip, with the reason; under CI=true
they fail instead.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import pytest

from tests.conftest import START_DEADLINE, Keyrotor, free_port, port_open, wait_for
from tests.deploy.deploy_files import DEPLOY, USER_ENV, compose, environment, render_template

TRUSTED = "127.0.0.1"  # where nginx's connections to the nodes come from, here as nginx's fixed address there


def unavailable(reason: str) -> NoReturn:
    """Skip on a developer's machine; fail in CI, where a missing nginx means a broken install step."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} (CI=true: the container tests must run)", pytrace=False)
    pytest.skip(reason)


def nginx_executable() -> str:
    override = os.environ.get("KEYROTOR_NGINX")
    if override:
        if not os.access(override, os.X_OK):
            unavailable(f"KEYROTOR_NGINX={override} is not an executable file")
        return override
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)
    if found is None:
        unavailable(
            "no nginx found (nginx on PATH, /usr/sbin/nginx or KEYROTOR_NGINX): ./test.sh installs Debian's"
            " nginx package when run as root or with passwordless sudo"
        )
    return found


@dataclass
class Node:
    """One keyrotor node: its proxy and UI processes (started by the shared Keyrotor) and their ports."""

    name: str
    proxy_port: int
    ui_port: int
    proxy: subprocess.Popen
    ui: subprocess.Popen | None  # None: nothing listens on ui_port (a test that leaves the UI alone)

    def ports(self) -> dict[int, int]:
        """The node's port for each port of the container (config's defaults, as compose.yaml names them)."""
        return {8080: self.proxy_port, 8081: self.ui_port}

    def stop_proxy(self) -> None:
        self.proxy.send_signal(signal.SIGTERM)
        self.proxy.wait(30)


@dataclass
class Nginx:
    tmp: Path
    process: subprocess.Popen
    proxy_port: int
    ui_port: int
    ports_of: dict[str, int] = field(default_factory=dict)  # a node's name by its proxy port

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}/v1"

    @property
    def ui_url(self) -> str:
        return f"http://127.0.0.1:{self.ui_port}"

    def served_by(self) -> list[str]:
        """The node nginx sent each proxied request to, in order (its access log's $upstream_addr)."""
        log = (self.tmp / "access.log").read_text()
        # "127.0.0.1:A, 127.0.0.1:B" when the first refused: the last one answered.
        return [tried.split(", ")[-1] for tried in re.findall(r"upstream=(.*)$", log, re.M)]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)  # graceful, as `docker stop` on the nginx image
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# The image's own nginx.conf around conf.d/default.conf, cut to what matters here: its paths point
# into the test's directory, and the access log names the node each request went to.
MAIN_CONF = """\
{user}worker_processes 1;
pid {tmp}/nginx.pid;
events {{ worker_connections 512; }}
http {{
    default_type application/octet-stream;
    keepalive_timeout 65;
    log_format nodes '$remote_addr "$request" $status upstream=$upstream_addr';
    access_log {tmp}/access.log nodes;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy_temp;
    fastcgi_temp_path {tmp}/fastcgi_temp;
    uwsgi_temp_path {tmp}/uwsgi_temp;
    scgi_temp_path {tmp}/scgi_temp;
    include {tmp}/conf.d/default.conf;
}}
"""


def rendered_values(nodes: dict[str, Node], proxy_port: int, ui_port: int) -> dict[str, str]:
    """compose.yaml's nginx variables as this machine resolves them: keyrotor-N:PORT → node N here."""
    values = {}
    for name, value in environment(compose(USER_ENV)["services"]["nginx"]).items():
        if name == "PROXY_LISTEN":
            values[name] = f"127.0.0.1:{proxy_port}"
        elif name == "UI_LISTEN":
            values[name] = f"127.0.0.1:{ui_port}"
        else:
            host, _, port = value.rpartition(":")
            values[name] = f"127.0.0.1:{nodes[host].ports()[int(port)]}"
    return values


def start_nginx(tmp: Path, nodes: dict[str, Node]) -> Nginx:
    executable = nginx_executable()
    tmp.mkdir(exist_ok=True)
    (tmp / "conf.d").mkdir(exist_ok=True)
    proxy_port, ui_port = free_port(), free_port()
    template = (DEPLOY / "nginx.conf").read_text()
    (tmp / "conf.d" / "default.conf").write_text(render_template(template, rendered_values(nodes, proxy_port, ui_port)))
    # As root, nginx's workers would run as `nobody`, who cannot enter the test's private directory.
    user = "user root;\n" if os.geteuid() == 0 else ""
    (tmp / "nginx.conf").write_text(MAIN_CONF.format(tmp=tmp, user=user))
    args = [executable, "-p", str(tmp), "-c", str(tmp / "nginx.conf"), "-e", str(tmp / "error.log")]
    checked = subprocess.run([*args, "-t"], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, f"nginx -t refused deploy/nginx.conf:\n{checked.stderr}"
    with (tmp / "stderr.log").open("wb") as stderr:
        process = subprocess.Popen([*args, "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=stderr)
    nginx = Nginx(tmp, process, proxy_port, ui_port, {str(n.proxy_port): n.name for n in nodes.values()})
    try:
        wait_for(
            lambda: (port_open(proxy_port) and port_open(ui_port)) or process.poll() is not None,
            START_DEADLINE,
            what="nginx",
        )
        assert process.poll() is None, (tmp / "error.log").read_text(errors="replace")
    except BaseException:
        nginx.stop()
        raise
    return nginx


@dataclass
class Cluster:
    """compose.yaml's nginx and two keyrotor nodes, here: one database, one fake upstream."""

    keyrotor: Keyrotor
    nodes: dict[str, Node]
    nginx: Nginx
    client_key: str
    near_key: str  # a client allowed from 127.0.0.2 only

    def served_by(self, requests: int) -> list[str]:
        """The node (keyrotor-1, keyrotor-2) that served each of the first `requests` requests, in order.

        nginx logs a request after its client has the answer: the lines are waited for."""
        logged = wait_for(lambda: len(a := self.nginx.served_by()) >= requests and a, what=f"{requests} log lines")
        return [self.nginx.ports_of.get(addr.rpartition(":")[2], addr) for addr in logged]


@pytest.fixture
def cluster(request: pytest.FixtureRequest, keyrotor: Keyrotor, tmp_path: Path) -> Iterator[Cluster]:
    """The nodes' proxies, and their UIs for a test parametrised with `indirect=True` and True."""
    with_ui = getattr(request, "param", False)
    nginx_executable()  # skip (or fail) before starting anything
    keyrotor.add_keys("sk-good-aaaaaaaaaaaaaaaaaaaaaaaaaaaa0001", "sk-good-bbbbbbbbbbbbbbbbbbbbbbbbbbbb0002")
    client_key = keyrotor.add_client("alice")
    near_key = keyrotor.setup("clients", "add", "near", "--ips", "127.0.0.2").stdout.strip().splitlines()[-1]
    nodes = {}
    for name in ("keyrotor-1", "keyrotor-2"):
        keyrotor.start_proxy("--set", f"access.trusted_proxies={TRUSTED}")
        proxy, proxy_port = keyrotor.processes[-1], keyrotor.proxy_port
        assert proxy_port
        if with_ui:
            keyrotor.start_ui("--set", f"ui.trusted_proxies={TRUSTED}")
            assert keyrotor.ui_port
            nodes[name] = Node(name, proxy_port, keyrotor.ui_port, proxy, keyrotor.processes[-1])
        else:
            nodes[name] = Node(name, proxy_port, free_port(), proxy, None)
    nginx = start_nginx(tmp_path / "nginx", nodes)
    try:
        yield Cluster(keyrotor, nodes, nginx, client_key, near_key)
    finally:
        nginx.stop()
