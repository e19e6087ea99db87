"""deploy/'s wiring, checked without a container runtime (none runs here): compose.yaml, the Dockerfile,
nginx.conf and .env.example agree with each other and with keyrotor's own settings.

Every KEYROTOR_* variable set is a real setting (or one of the secrets keyrotor reads) with a value its
check accepts; the ports nginx sends to are the ports the nodes listen on; health checks run what
exists; every node keeps its data in a volume of its own; the image runs as no root; no secret
value is committed, and compose refuses to start without them.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
import subprocess

import pytest

from config import BY_NAME, SETTINGS
from core.addresses import is_trusted, parse_networks
from tests.deploy.deploy_files import (
    DEPLOY,
    ROOT,
    USER_ENV,
    MissingVariable,
    compose,
    directives,
    dockerfile,
    dockerfile_env,
    env_file,
    environment,
    raw_compose,
    seconds,
    size_bytes,
    template_variables,
)

# Variables keyrotor reads that are not settings (docs/configuration.md).
SECRET_VARIABLES = {"KEYROTOR_SECRET", "KEYROTOR_ADMIN_KEY"}
NODES = ("keyrotor-1", "keyrotor-2")


@pytest.fixture(scope="module")
def services() -> dict:
    return compose(USER_ENV)["services"]


def setting_of(variable: str):
    """The setting a KEYROTOR_<SECTION>_<KEY> variable sets, or None."""
    return next((s for s in SETTINGS if s.env_var == variable), None)


def node_settings(services: dict, node: str) -> dict[str, str]:
    """A node's KEYROTOR_* variables: the image's, overridden by compose's."""
    env = {**dockerfile_env(), **environment(services[node])}
    return {k: v for k, v in env.items() if k.startswith("KEYROTOR_")}


def default(name: str):
    return BY_NAME[name].default


def test_the_services_are_nginx_two_nodes_postgresql_and_redis(services):
    assert set(services) == {"nginx", *NODES, "postgres", "redis"}
    for node in NODES:
        assert services[node]["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
        assert (DEPLOY / services[node]["build"]["context"]).resolve() == ROOT  # relative to compose.yaml
        assert services[node]["command"][0] in ("serve", "proxy")  # a run.py command that serves clients


@pytest.mark.parametrize("node", NODES)
def test_every_keyrotor_variable_is_a_real_setting_with_a_good_value(services, node):
    variables = node_settings(services, node)
    assert variables
    for variable, value in variables.items():
        setting = setting_of(variable)
        if setting is not None:
            setting.check(value, f"{node}'s {variable}")  # ConfigError names it
        else:
            assert variable in SECRET_VARIABLES, f"{variable} is not a keyrotor setting"


def test_the_nodes_listen_where_nginx_sends_and_the_image_exposes(services):
    for node in NODES:
        settings = node_settings(services, node)
        assert settings.get("KEYROTOR_PROXY_PORT", str(default("proxy.port"))) == str(default("proxy.port"))
        assert settings.get("KEYROTOR_UI_PORT", str(default("ui.port"))) == str(default("ui.port"))
        assert settings["KEYROTOR_PROXY_HOST"] == settings["KEYROTOR_UI_HOST"] == "0.0.0.0"  # reachable by nginx
        assert "ports" not in services[node]  # clients reach the nodes through nginx only
    exposed = {int(p) for i in dockerfile() if i.keyword == "EXPOSE" for p in i.args.split()}
    assert exposed == {default("proxy.port"), default("ui.port")}
    nginx = environment(services["nginx"])
    for number, node in enumerate(NODES, 1):
        assert nginx[f"NODE_{number}_PROXY"] == f"{node}:{default('proxy.port')}"
        assert nginx[f"NODE_{number}_UI"] == f"{node}:{default('ui.port')}"
    published = {p.rsplit(":", 1)[1] for p in services["nginx"]["ports"]}
    assert published == {nginx["PROXY_LISTEN"], nginx["UI_LISTEN"]}


def test_nginx_and_its_template_name_the_same_variables(services):
    template = (DEPLOY / "nginx.conf").read_text()
    assert template_variables(template) == set(environment(services["nginx"]))
    mount = "./nginx.conf:/etc/nginx/templates/default.conf.template:ro"  # the image's envsubst input
    assert services["nginx"]["volumes"] == [mount]
    upstreams = dict(re.findall(r"(?m)^upstream (\w+) \{(.*?)^\}", template, re.S))
    assert re.findall(r"server \$\{(\w+)\}", upstreams["keyrotor_proxy"]) == ["NODE_1_PROXY", "NODE_2_PROXY"]
    assert re.findall(r"server \$\{(\w+)\}", upstreams["keyrotor_ui"]) == ["NODE_1_UI", "NODE_2_UI"]


def test_nginx_passes_streams_and_uploads_through_within_keyrotors_limits():
    template = (DEPLOY / "nginx.conf").read_text()
    proxy_server = template.split("# The monitor UI.")[0]
    assert directives(proxy_server, "proxy_buffering") == ["off"]
    assert directives(proxy_server, "proxy_request_buffering") == ["off"]
    assert directives(proxy_server, "proxy_http_version") == ["1.1"]
    assert [size_bytes(v) for v in directives(proxy_server, "client_max_body_size")] == [
        default("proxy.max_body_bytes")
    ]
    read_timeouts = [seconds(v) for v in directives(proxy_server, "proxy_read_timeout")]
    assert min(read_timeouts) > default("keypool.attempt_timeout_seconds")  # keyrotor's own timeouts decide
    assert "Connection $connection_upgrade" in directives(proxy_server, "proxy_set_header")
    assert "Upgrade $http_upgrade" in directives(proxy_server, "proxy_set_header")
    assert "X-Forwarded-For $proxy_add_x_forwarded_for" in directives(proxy_server, "proxy_set_header")


def test_the_nodes_trust_nginxs_address_and_only_it(services):
    raw = raw_compose()
    subnet = ipaddress.ip_network(raw["networks"]["front"]["ipam"]["config"][0]["subnet"])
    nginx_address = services["nginx"]["networks"]["front"]["ipv4_address"]
    addresses = [nginx_address] + [services[n]["networks"]["front"]["ipv4_address"] for n in NODES]
    assert len(set(addresses)) == 3 and all(ipaddress.ip_address(a) in subnet for a in addresses)
    for node in NODES:
        settings = node_settings(services, node)
        for name in ("KEYROTOR_ACCESS_TRUSTED_PROXIES", "KEYROTOR_UI_TRUSTED_PROXIES"):
            trusted = parse_networks(settings[name])
            assert is_trusted(nginx_address, trusted), name
            others = [a for a in addresses[1:]]
            assert not any(is_trusted(a, trusted) for a in others), f"{name} trusts a node"


def test_postgresql_and_redis_are_the_nodes_and_theirs_alone(services):
    postgres = environment(services["postgres"])
    url = node_settings(services, "keyrotor-1")["KEYROTOR_STORAGE_URL"]
    expected = f"postgresql://{postgres['POSTGRES_USER']}:{USER_ENV['POSTGRES_PASSWORD']}@postgres:5432/"
    assert url == expected + postgres["POSTGRES_DB"]
    assert node_settings(services, "keyrotor-1")["KEYROTOR_REDIS_URL"] == "redis://redis:6379/0"
    assert node_settings(services, "keyrotor-1") == node_settings(services, "keyrotor-2")
    raw = raw_compose()
    assert raw["networks"]["data"]["internal"] is True
    for name in ("postgres", "redis"):
        assert list(services[name]["networks"]) == ["data"] and "ports" not in services[name]
    for node in NODES:
        assert set(services[node]["networks"]) == {"front", "data"}


def test_every_service_has_a_health_check_and_starts_after_what_it_needs(services):
    for name, service in services.items():
        test = service["healthcheck"]["test"]
        assert test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, name
    for node in NODES:
        assert services[node]["healthcheck"]["test"] == ["CMD", "python", "deploy/healthcheck.py"]
        assert services[node]["depends_on"] == {
            "postgres": {"condition": "service_healthy"},
            "redis": {"condition": "service_healthy"},
        }
    assert services["nginx"]["depends_on"] == {node: {"condition": "service_healthy"} for node in NODES}
    # nginx's own check asks a node's /health through the UI port it listens on.
    nginx_check = services["nginx"]["healthcheck"]["test"]
    assert nginx_check[-1] == f"http://127.0.0.1:{environment(services['nginx'])['UI_LISTEN']}/health"
    (healthcheck,) = [i for i in dockerfile() if i.keyword == "HEALTHCHECK"]
    assert healthcheck.args.endswith('CMD ["python", "deploy/healthcheck.py"]')
    assert (ROOT / "deploy" / "healthcheck.py").is_file()


def test_every_node_keeps_its_data_in_a_volume_of_its_own(services):
    raw = raw_compose()
    declared = set(raw["volumes"])
    mounts: dict[str, str] = {}
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if not source.startswith("."):  # ./nginx.conf is a file of the checkout
                assert source in declared, f"{name} mounts {source}, which is not a named volume"
                assert source not in mounts, f"{source} is shared by {mounts[source]} and {name}"
                mounts[source] = name
            if name in NODES:
                data_dir = posixpath.dirname(node_settings(services, name)["KEYROTOR_STORAGE_PATH"])
                assert target == data_dir, f"{name}'s storage.path is not in its volume"
    assert set(mounts.values()) == {*NODES, "postgres", "redis"}
    assert services["postgres"]["volumes"] == ["postgres-data:/var/lib/postgresql/data"]
    assert services["redis"]["volumes"] == ["redis-data:/data"] and "--appendonly" in services["redis"]["command"]


def test_the_image_is_python_312_slim_and_runs_as_no_root():
    instructions = dockerfile()
    base = next(i.args for i in instructions if i.keyword == "FROM")
    match = re.fullmatch(r"python:3\.(\d+)-slim(?:-\w+)?", base)
    assert match and int(match[1]) >= 12, base
    users = [i.args for i in instructions if i.keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    last_user = max(n for n, i in enumerate(instructions) if i.keyword == "USER")
    assert all(i.keyword != "RUN" for i in instructions[last_user:])  # nothing runs as root after it
    assert [i.args for i in instructions if i.keyword == "ENTRYPOINT"] == ['["python", "run.py"]']
    assert [i.args for i in instructions if i.keyword == "CMD"] == ['["serve"]']
    copied = [i.args for i in instructions if i.keyword == "COPY"]
    assert copied == ["requirements.txt ./", ". ."]
    assert any("pip install -r requirements.txt" in i.args for i in instructions if i.keyword == "RUN")


def test_no_secret_is_committed_and_compose_refuses_to_start_without_them():
    example = env_file(DEPLOY / ".env.example")
    assert set(USER_ENV) <= set(example)
    assert all(example[name] == "" for name in USER_ENV)  # placeholders, never a value
    for name in USER_ENV:
        with pytest.raises(MissingVariable, match=name):
            compose({**USER_ENV, name: ""})
        with pytest.raises(MissingVariable, match=name):
            compose({k: v for k, v in USER_ENV.items() if k != name})
    # The secrets reach the nodes only from the environment, never as a value in a committed file.
    text = (DEPLOY / "compose.yaml").read_text() + (DEPLOY / "Dockerfile").read_text()
    for value in USER_ENV.values():
        assert value not in text
    for instruction in dockerfile():
        if instruction.keyword in ("ENV", "ARG"):
            assert not re.search(r"SECRET|ADMIN_KEY|PASSWORD|TOKEN", instruction.args), instruction
    for node in NODES:
        raw_env = raw_compose()["services"][node]["environment"]
        assert raw_env["KEYROTOR_SECRET"].startswith("${KEYROTOR_SECRET:?")
        assert raw_env["KEYROTOR_ADMIN_KEY"].startswith("${KEYROTOR_ADMIN_KEY:?")
    # deploy/.env (the real one) is ignored by git and kept out of the image, as are databases.
    ignored = subprocess.run(["git", "check-ignore", "-q", "deploy/.env"], cwd=ROOT).returncode
    assert ignored == 0, "deploy/.env must be in .gitignore"
    dockerignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for pattern in ("**/.env", "data", "**/*.db*", ".venv", ".git"):
        assert pattern in dockerignore, pattern
