"""Azure model lists (issue 20 §6): `models refresh` never takes a model id for a deployment name,
and a deployment Azure says does not exist costs one attempt, not one per request.

The official openai client → a real mitmproxy running keyrotor → a fake Azure resource and a relay.
"""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from tests.conftest import Keyrotor, wait_for
from tests.fake_upstream import FakeAzure, FakeUpstream

AZURE_KEY = "0123456789abcdef0123456789abcdef"
RELAY_KEY = "sk-good-azure-relay-" + "r" * 20 + "0001"
MESSAGES = [{"role": "user", "content": "hello"}]


@pytest.fixture
def relay() -> Iterator[FakeUpstream]:
    with FakeUpstream(models={"gpt-4o"}).start() as up:
        yield up


@pytest.fixture
def azure() -> Iterator[FakeAzure]:
    with FakeAzure({"prod-gpt4o": "gpt-4o-2024-08-06"}).start() as up:
        up.set_key(AZURE_KEY, "ok")
        yield up


def served(kr: Keyrotor, relay: FakeUpstream, azure: FakeAzure, deployment: str) -> None:
    kr.setup("upstreams", "add", "relay", relay.url + "/v1")
    kr.setup("upstreams", "add", "azure", azure.url, "--dialect", "azure", "--api-version", "2024-10-21")
    kr.setup("groups", "add", "azure/prod", "--priority", "10")  # tried first
    kr.setup("groups", "add", "relay/cheap", "--priority", "5")
    kr.setup("models", "add", "azure/prod", "gpt-4o", "--as", deployment)
    kr.setup("models", "add", "relay/cheap", "gpt-4o")
    kr.setup("keys", "add", "--group", "azure/prod", input=AZURE_KEY + "\n")
    kr.setup("keys", "add", "--group", "relay/cheap", input=RELAY_KEY + "\n")
    kr.setup("groups", "disable", "default/default")


def test_models_refresh_on_an_azure_group_adds_nothing_and_says_why(keyrotor: Keyrotor, relay, azure):
    served(keyrotor, relay, azure, "prod-gpt4o")
    before = keyrotor.cli("models", "list").stdout
    result = keyrotor.cli("models", "refresh", "azure/prod", check=False)
    assert result.returncode == 1
    assert "azure/prod: not refreshed: Azure lists the models a resource can deploy, not its deployments" in (
        result.stdout
    )
    assert "--as DEPLOYMENT" in result.stdout
    assert keyrotor.cli("models", "list").stdout == before  # no model id became a deployment name
    assert azure.received == []  # nothing asked: the answer could not be used


def test_a_deployment_azure_says_does_not_exist_costs_one_attempt_until_the_routes_change(
    keyrotor: Keyrotor, relay, azure
):
    served(keyrotor, relay, azure, "gone-gpt4o")  # no such deployment at the resource
    client_key = keyrotor.add_client("alice")
    keyrotor.start_proxy()
    client = openai.OpenAI(base_url=keyrotor.base_url, api_key=client_key, max_retries=0, timeout=20)
    for _ in range(4):
        assert client.chat.completions.create(model="gpt-4o", messages=MESSAGES).choices[0].message.content
    assert [r.path for r in azure.received] == ["/openai/deployments/gone-gpt4o/chat/completions"]  # once
    assert len([r for r in relay.received if r.path == "/v1/chat/completions"]) == 4

    keyrotor.cli("models", "add", "azure/prod", "gpt-4o", "--as", "prod-gpt4o")  # fixed by hand
    wait_for(
        lambda: client.chat.completions.create(model="gpt-4o", messages=MESSAGES) and len(azure.received) > 1,
        what="the corrected deployment asked again",
    )
    assert azure.received[-1].path == "/openai/deployments/prod-gpt4o/chat/completions"
