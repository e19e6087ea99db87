"""The dashboard's time range and spend per day: from the rollups, following ?range= or since/until."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest

from storage import client_keys
from tests.monitor_ui.conftest import OpenUI, stored_flow, write_flows

ADMIN = "admin-ranges"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
DAY = 86400
NOW = time.time()


@pytest.fixture
def client(open_ui: OpenUI):
    """Flows now, 3 days ago and 20 days ago: two clients (one without any limit), two models."""

    def seed(conn, path) -> None:
        client_keys.create_client(conn, "alice")  # no limits at all: spend is still counted
        client_keys.create_client(conn, "bob", client_keys.policy_of('{"daily_usd": 5}'))
        rows = [
            stored_flow(1, NOW, client_key_id=1, cost=0.5),
            stored_flow(2, NOW - 3 * DAY, client_key_id=1, cost=0.25, model="gpt-4o"),
            stored_flow(3, NOW - 20 * DAY, client_key_id=2, cost=1.0, status=500),
        ]
        write_flows(conn, rows)

    return open_ui(ADMIN, seed=seed)


def dashboard(client, **query: str) -> dict:
    answer = client.get("/api/dashboard", params=query, headers=AUTH)
    assert answer.status_code == 200, answer.text
    return answer.json()


@pytest.mark.parametrize(
    "query, grain, requests, models",
    [
        ({}, "hour", 1, {"gpt-4o-mini"}),
        ({"range": "1h"}, "minute", 1, {"gpt-4o-mini"}),
        ({"range": "7d"}, "hour", 2, {"gpt-4o-mini", "gpt-4o"}),
        ({"range": "30d"}, "day", 3, {"gpt-4o-mini", "gpt-4o"}),
    ],
)
def test_the_range_drives_the_series_and_the_breakdowns(client, query, grain, requests, models):
    data = dashboard(client, **query)
    assert data["range"]["grain"] == grain and data["range"]["name"] == query.get("range", "24h")
    assert sum(r for _, r, _ in data["series"]) == requests
    assert {row["id"] for row in data["breakdowns"]["model"]} == models
    assert sum(row["requests"] for row in data["breakdowns"]["model"]) == requests


def test_a_custom_range(client):
    since = datetime.fromtimestamp(NOW - 25 * DAY, UTC).strftime("%Y-%m-%dT%H:%M")
    until = datetime.fromtimestamp(NOW - 2 * DAY, UTC).strftime("%Y-%m-%dT%H:%M")
    data = dashboard(client, since=since, until=until)
    assert data["range"]["name"] == "custom" and data["range"]["grain"] == "day"
    assert sum(r for _, r, _ in data["series"]) == 2  # 20 and 3 days ago, not today
    assert {row["id"] for row in data["breakdowns"]["model"]} == {"gpt-4o-mini", "gpt-4o"}


@pytest.mark.parametrize(
    "query, message",
    [
        ({"range": "2w"}, "range must be one of 1h, 24h, 7d, 30d"),
        ({"until": "2026-01-01T00:00"}, "A custom range needs since"),
        ({"since": "2026-01-02T00:00", "until": "2026-01-01T00:00"}, "until must be after since"),
        ({"since": "yesterday"}, "since must be a date and time"),
        ({"since": "2000-01-01T00:00", "until": "2026-01-01T00:00"}, "at most 400 days"),
    ],
)
def test_a_bad_range_is_a_clear_422(client, query, message):
    answer = client.get("/api/dashboard", params=query, headers=AUTH)
    assert answer.status_code == 422 and message in answer.json()["error"]["message"]


def test_spend_per_day_for_30_days_in_total_and_per_client_key_model_group(client):
    spend = dashboard(client)["spend_per_day"]
    days = spend["days"]
    assert len(days) == 30 and days[-1] == int(NOW // DAY) * DAY
    assert spend["total"][-1] == 0.5 and spend["total"][-4] == 0.25 and spend["total"][-21] == 1.0
    assert sum(spend["total"]) == pytest.approx(1.75)
    by_client = {row["label"]: row for row in spend["by"]["client"]}
    assert by_client["alice"]["total"] == pytest.approx(0.75) and by_client["alice"]["days"][-1] == 0.5
    assert by_client["bob"]["total"] == pytest.approx(1.0)
    assert {row["id"]: row["total"] for row in spend["by"]["model"]} == {"gpt-4o-mini": 1.5, "gpt-4o": 0.25}
    assert [row["total"] for row in spend["by"]["key"]] == [1.75]
    page = client.get("/dashboard?spend_by=model", headers=AUTH).text
    assert 'id="spend-table"' in page and "gpt-4o-mini" in page
    assert client.get("/dashboard?spend_by=nothing", headers=AUTH).status_code == 422


def test_the_breakdowns_link_to_the_flows_of_the_same_range(client):
    page = client.get("/dashboard?range=7d", headers=AUTH).text
    assert 'href="/flows?model=gpt-4o&amp;range=7d"' in page
    assert client.get("/api/flows?model=gpt-4o&range=7d", headers=AUTH).json()["flows"][0]["model"] == "gpt-4o"
    assert client.get("/api/flows?model=gpt-4o&range=24h", headers=AUTH).json()["flows"] == []
