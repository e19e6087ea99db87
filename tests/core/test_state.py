"""core/state.py: the routes a request may take, without deployments Azure said do not exist (issue 20 §6)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from core.classify import is_deployment_missing
from core.failover import Failover
from core.routing import Candidate, Dialect, Group, Upstream
from core.state import KEYS, ROUTES, Loaded, ProxyState
from core.upstream import AZURE_LISTS_NO_DEPLOYMENTS, ModelListError, list_models

AZURE = Upstream(2, "azure", "https://res.openai.azure.com", Dialect.AZURE, "2024-10-21")
RELAY = Upstream(3, "relay", "https://relay.example.com/v1")
PROD = Group(1, AZURE, "prod", priority=10, models={"gpt-4o": "gone-gpt4o"})
CHEAP = Group(2, RELAY, "cheap", priority=5, models={"gpt-4o": None})
NOT_FOUND = (
    b'{"error": {"code": "DeploymentNotFound", "message": "The API deployment for this resource does not exist."}}'
)
OPENAI_MISSING = b'{"error": {"code": "model_not_found", "message": "The model `gpt-4o` does not exist or you do not have access to it."}}'  # noqa: E501


def loaded(revision: int, groups: list[Group] = [PROD, CHEAP]) -> Loaded:  # noqa: B006
    return Loaded({KEYS: 1, ROUTES: revision}, (groups, {}), [])


def state_with_routes() -> ProxyState:
    state = ProxyState()
    state.apply(loaded(1))
    return state


def failover_of(state: ProxyState) -> Failover:
    return Failover(state.rotations.get, lambda: state.settings)


@pytest.mark.parametrize(
    ("status", "body", "missing"),
    [
        (404, NOT_FOUND, True),
        (404, OPENAI_MISSING, False),  # one key's project may lack access: nothing about the group
        (404, b'{"error": {"code": "404", "message": "Resource not found"}}', False),
        (400, NOT_FOUND, False),
        (404, None, False),
    ],
)
def test_only_azures_deployment_not_found_marks_a_deployment(status, body, missing):
    assert is_deployment_missing(status, body) is missing


def test_a_deployment_azure_says_does_not_exist_is_skipped_while_another_route_serves_the_model():
    state = state_with_routes()
    routes = state.table.candidates("gpt-4o")
    assert [c.group.id for c in state.usable(routes)] == [PROD.id, CHEAP.id]
    failover_of(state).missing(routes[0], 404, NOT_FOUND)
    assert [c.group.id for c in state.usable(routes)] == [CHEAP.id]
    failover_of(state).missing(routes[1], 404, OPENAI_MISSING)  # not Azure's: no mark
    assert [c.group.id for c in state.usable(routes)] == [CHEAP.id]


def test_when_every_route_is_marked_upstreams_own_answer_is_what_the_client_gets():
    state = state_with_routes()
    only = [Candidate(PROD, "gpt-4o", "gone-gpt4o")]
    failover_of(state).missing(only[0], 404, NOT_FOUND)
    assert state.usable(only) == only


def test_a_route_change_clears_the_marks_and_a_key_change_does_not():
    state = state_with_routes()
    routes = state.table.candidates("gpt-4o")
    failover_of(state).missing(routes[0], 404, NOT_FOUND)
    state.apply(Loaded({KEYS: 2, ROUTES: 1}, ([PROD, CHEAP], {}), []))  # a key changed state
    assert state.rotations[PROD.id].missing == {"gone-gpt4o"}
    state.apply(loaded(2))  # models refresh, models add --as: upstream is believed again
    assert state.rotations[PROD.id].missing == set()
    assert len(state.usable(state.table.candidates("gpt-4o"))) == 2


def test_an_azure_model_list_is_never_taken_for_deployments():
    async def listed() -> list[str]:
        async with httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(500))) as client:
            return await list_models(client, AZURE, "https://api.openai.com", "k" * 32)

    with pytest.raises(ModelListError) as refused:
        asyncio.run(listed())
    assert str(refused.value) == AZURE_LISTS_NO_DEPLOYMENTS
    assert "--as DEPLOYMENT" in str(refused.value)
