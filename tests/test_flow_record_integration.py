"""A flow is recorded as the client sent it; each attempt as it went upstream. Through a real mitmproxy in
front of a fake Azure resource and a relay: an Azure retry keeps the client's path, "copy as curl" replays
to 200 against keyrotor, an alias renamed for upstream is recorded under the client's name, and mitmweb
shows a retried flow as the key that answered sent it (a placeholder, never the key)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator

import httpx
import openai
import pytest

from core.credentials import placeholder
from tests.conftest import ADMIN_KEY, Keyrotor, free_port, port_open, stored_flows, wait_for
from tests.fake_upstream import FakeAzure, FakeUpstream

BAD_AZURE = "0123456789abcdef0123456789abcd01"  # Azure's keys are 32 hex digits
GOOD_AZURE = "0123456789abcdef0123456789abcd02"
RELAY_KEY = "sk-good-record-relay-aaaaaaaaaaaaaaaa03"
MESSAGES = [{"role": "user", "content": "Which path did I send?"}]
CLIENT_PATH = "/v1/chat/completions"


@pytest.fixture
def azure() -> Iterator[FakeAzure]:
    deployments = {"prod-gpt4o": "gpt-4o-2024-08-06", "backup-gpt4o": "gpt-4o-2024-08-06"}
    with FakeAzure(deployments).start() as up:
        up.set_key(BAD_AZURE, "invalid")
        up.set_key(GOOD_AZURE, "ok")
        yield up


def route_to_azure(kr: Keyrotor, azure: FakeAzure, relay: FakeUpstream | None = None) -> str:
    """gpt-4o: azure/prod first (its one key is refused), then azure/backup; the client's key."""
    kr.setup("upstreams", "add", "azure", azure.url, "--dialect", "azure", "--api-version", "2024-10-21")
    kr.setup("groups", "add", "azure/prod", "--priority", "10")
    kr.setup("groups", "add", "azure/backup", "--priority", "5")
    kr.setup("models", "add", "azure/prod", "gpt-4o", "--as", "prod-gpt4o")
    kr.setup("models", "add", "azure/backup", "gpt-4o", "--as", "backup-gpt4o")
    kr.setup("keys", "add", "--group", "azure/prod", input=BAD_AZURE + "\n")
    kr.setup("keys", "add", "--group", "azure/backup", input=GOOD_AZURE + "\n")
    if relay is not None:
        kr.setup("upstreams", "add", "relay", relay.url + "/v1")
        kr.setup("groups", "add", "relay/cheap", "--priority", "10")
        kr.setup("models", "add", "relay/cheap", "gpt-4o-mini", "--as", "gpt-4o-mini-2024-07-18")
        kr.setup("keys", "add", "--group", "relay/cheap", input=RELAY_KEY + "\n")
    kr.setup("groups", "disable", "default/default")
    return kr.add_client("alice")


def admin_api(kr: Keyrotor, path: str) -> dict:
    response = httpx.get(f"{kr.ui_url}{path}", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10)
    response.raise_for_status()
    return response.json()


def replay(curl: str, client_key: str) -> tuple[int, str]:
    """Run "copy as curl" as a user pastes it into a shell, the client's key in $KEYROTOR_API_KEY."""
    command = curl + " -s -o /dev/stdout -w '\\n%{http_code}'"
    env = {**os.environ, "KEYROTOR_API_KEY": client_key}
    done = subprocess.run(["sh", "-c", command], capture_output=True, text=True, env=env, timeout=30)
    body, _, status = done.stdout.rpartition("\n")
    return int(status), body


def test_an_azure_retry_is_recorded_as_the_client_sent_it_and_its_curl_replays(
    keyrotor: Keyrotor, azure: FakeAzure, upstream: FakeUpstream
):
    relay = upstream  # the fake OpenAI upstream stands in for a relay with its own names for models
    client_key = route_to_azure(keyrotor, azure, relay)
    keyrotor.start_proxy()
    keyrotor.start_ui("--proxy-port", str(keyrotor.proxy_port))  # "copy as curl" points at this proxy
    client = openai.OpenAI(base_url=keyrotor.base_url, api_key=client_key, max_retries=0, timeout=20)
    first = client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert first.choices[0].message.content
    assert [r.path for r in azure.received] == [
        "/openai/deployments/prod-gpt4o/chat/completions",
        "/openai/deployments/backup-gpt4o/chat/completions",
    ]
    (row,) = wait_for(lambda: stored_flows(keyrotor.db_path), what="the retried flow")
    assert (row["method"], row["path"], row["model"], row["status"]) == ("POST", CLIENT_PATH, "gpt-4o", 200)
    assert json.loads(row["request_body"])["model"] == "gpt-4o"

    (listed,) = admin_api(keyrotor, "/api/flows")["flows"]
    assert listed["path"] == CLIENT_PATH and listed["group"] == "azure/backup"
    detail = admin_api(keyrotor, f"/api/flows/{listed['id']}")
    base = f"{azure.url}/openai/deployments"
    assert [(a["attempt"], a["status"], a["url"]) for a in detail["attempt_list"]] == [
        (1, 401, f"{base}/prod-gpt4o/chat/completions?api-version=2024-10-21"),
        (2, 200, f"{base}/backup-gpt4o/chat/completions?api-version=2024-10-21"),
    ]
    assert [(a["group"], a["upstream_key"]) for a in detail["attempt_list"]] == [
        ("azure/prod", "#1 (…cd01)"),
        ("azure/backup", "#2 (…cd02)"),
    ]
    curl = detail["curl"]
    assert f" http://127.0.0.1:{keyrotor.proxy_port}{CLIENT_PATH} " in curl and "deployments" not in curl
    for secret in (BAD_AZURE, GOOD_AZURE, client_key):
        assert secret not in curl

    status, body = replay(curl, client_key)
    assert status == 200, body
    assert json.loads(body)["model"] == first.model  # the same deployment answered, as the first time
    replayed = wait_for(lambda: (r := stored_flows(keyrotor.db_path)) and len(r) == 2 and r[-1], what="the replay")
    assert (replayed["path"], replayed["model"], replayed["status"]) == (CLIENT_PATH, "gpt-4o", 200)

    # A relay's alias: upstream got its own name, the record keeps the client's (and so does its curl).
    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert json.loads(relay.received[-1].body)["model"] == "gpt-4o-mini-2024-07-18"
    aliased = wait_for(lambda: (r := stored_flows(keyrotor.db_path)) and len(r) == 3 and r[-1], what="the alias")
    assert json.loads(aliased["request_body"])["model"] == "gpt-4o-mini"
    status, body = replay(admin_api(keyrotor, "/api/flows/3")["curl"], client_key)
    assert status == 200 and json.loads(body)["model"] == "gpt-4o-mini"


def test_mitmweb_credits_a_retried_flow_to_the_key_that_answered(keyrotor: Keyrotor, azure: FakeAzure):
    client_key = route_to_azure(keyrotor, azure)
    web_port = free_port()
    keyrotor.start_proxy("--web", "--set", f"proxy.web_port={web_port}")
    wait_for(lambda: port_open(web_port), 30, what="mitmweb")
    client = openai.OpenAI(base_url=keyrotor.base_url, api_key=client_key, max_retries=0, timeout=20)
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    mitmweb = f"http://127.0.0.1:{web_port}"

    def answered() -> list[dict]:
        flows = httpx.get(f"{mitmweb}/flows", params={"token": ADMIN_KEY}, timeout=10).json()
        return [f for f in flows if f.get("response") and f["response"]["status_code"] == 200]

    (flow,) = wait_for(answered, what="the answered flow in mitmweb")
    request = flow["request"]
    headers = dict((name.lower(), value) for name, value in request["headers"])
    assert headers["api-key"] == placeholder(2, "cd02")  # the key that answered, not the one refused
    assert "authorization" not in headers
    assert request["path"] == "/openai/deployments/backup-gpt4o/chat/completions?api-version=2024-10-21"
    dump = httpx.get(f"{mitmweb}/flows/dump", params={"token": ADMIN_KEY}, timeout=10).content.decode("latin-1")
    for secret in (BAD_AZURE, GOOD_AZURE, client_key):
        assert secret not in dump and secret not in json.dumps(flow)
    # The record, meanwhile, is the client's request.
    (row,) = wait_for(lambda: stored_flows(keyrotor.db_path), what="the record")
    assert row["path"] == CLIENT_PATH
