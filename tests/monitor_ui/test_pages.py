"""The monitor's pages and JSON twins on a seeded database: dashboard, filters and search, exports,
flow detail extras, key and client administration, /metrics — and who may use them."""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from core.records import AttemptLog
from storage import client_keys, db, flows, secrets
from storage.upstream_keys import SqliteKeyStore
from tests.monitor_ui.conftest import assert_sent_to_login, assert_served, flow_ids, log_in, stored_flow, write_flows
from usecases.keys import add_keys

ADMIN = "kra-pages-test-admin-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
# Half a minute into the current minute: rows 1-5 (NOW - 99 to NOW - 95) then share one minute's bucket,
# which the chart test counts; with time.time() itself they straddled a minute one run in fifteen.
NOW = time.time() // 60 * 60 + 30
KEYS = ["sk-good-pages-aaaaaaaaaaaaaaaaaaaaa0001", "sk-good-pages-bbbbbbbbbbbbbbbbbbbbb0002"]


def row(n: int, **overrides) -> dict:
    body = {"model": overrides.get("model", "gpt-4o-mini"), "messages": [{"role": "user", "content": f"question {n}"}]}
    extras = {
        "client_key_id": 1,
        "client_addr": "127.0.0.1",
        "request_headers": [["content-type", "application/json"], ["authorization", "[redacted]"]],
        "request_body": json.dumps(body),
        "request_body_size": 80,
        "request_body_truncated": 0,
        "response_body_size": 60,
        "response_body_truncated": 0,
    }
    return stored_flow(n, NOW, **(extras | overrides))


ROWS = [
    row(1),
    row(2, model="gpt-4o", status=429, upstream_key_id=2, cost=None),
    row(
        3,
        stream=1,
        response_body='data: {"choices":[{"delta":{"content":"zebra"}}]}\n\ndata: [DONE]\n\n',
        chunk_times=[[0, 51], [12.5, 14]],
        attempts=2,
        attempt_log=[
            AttemptLog(attempt=1, key_id=2, status=429, error=None, started_at=NOW - 97, duration_ms=3.0),
            AttemptLog(attempt=2, key_id=1, status=200, error=None, started_at=NOW - 96.9, duration_ms=90.0),
        ],
    ),
    row(4, path="/v1/embeddings", model="text-embedding-3-small", status=500, client_key_id=2),
    row(5, status=None, error="server closed connection", request_body='{"model":"gpt-4o-mini","q":"aardvark"}'),
]


@pytest.fixture
def client(open_ui, upstream) -> TestClient:
    def seed(conn, path: Path) -> None:
        add_keys(SqliteKeyStore(conn, secrets.key_cipher(path)), KEYS)
        client_keys.create_client(conn, "alice")
        client_keys.create_client(conn, "bob")
        write_flows(conn, ROWS)

    return open_ui(ADMIN, {"proxy.upstream": upstream.url, "ui.metrics_token": "prom-token-123"}, seed)


def logged_in(client: TestClient) -> str:
    """Log in; returns the CSRF token of the session's pages."""
    return log_in(client, ADMIN)


PAGES = ["/dashboard", "/flows", "/flows/1", "/keys", "/keys/1", "/clients"]
APIS = [
    "/api/dashboard",
    "/api/flows",
    "/api/flows/1",
    "/api/keys",
    "/api/keys/1",
    "/api/clients",
    "/api/flows/export.jsonl",
    "/api/flows/export.har",
    "/metrics",
]
FORMS = [
    "/keys/add",
    "/keys/1/disable",
    "/keys/1/delete",
    "/keys/1/validate",
    "/keys/1/edit",
    "/keys/validate",
    "/keys/reset-invalid",
    "/clients",
    "/clients/1/disable",
    "/clients/1/delete",
]
API_CHANGES = [
    ("/api/keys", {"keys": ["sk-good-new-xxxxxxxxxxxxxxxxxxxxxxxx"]}),
    ("/api/keys/1/disable", None),
    ("/api/keys/1/weight", {"weight": 2}),
    ("/api/keys/validate", {}),
    ("/api/keys/reset", None),
    ("/api/clients", {"name": "carol"}),
    ("/api/clients/1/delete", None),
]


@pytest.mark.parametrize("url", PAGES)
def test_pages_send_strangers_to_login(client, url):
    assert_sent_to_login(client.get(url))


@pytest.mark.parametrize("url", APIS)
def test_apis_refuse_strangers(client, url):
    response = client.get(url, headers={"Authorization": "Bearer kra-wrong"})
    assert response.status_code == 401
    assert "error" in response.json()


@pytest.mark.parametrize("url", FORMS)
def test_form_posts_without_the_csrf_token_change_nothing(client, url):
    logged_in(client)
    before = client.get("/api/keys", headers=AUTH).json(), client.get("/api/clients", headers=AUTH).json()
    response = client.post(url, data={"keys": "sk-good-sneaky-xxxxxxxxxxxxxxxxxxxx", "name": "mallory"})
    assert response.status_code == 403
    assert (client.get("/api/keys", headers=AUTH).json(), client.get("/api/clients", headers=AUTH).json()) == before


@pytest.mark.parametrize("url, body", API_CHANGES)
def test_api_changes_with_a_session_need_the_csrf_header(client, url, body):
    logged_in(client)
    assert client.post(url, json=body).status_code == 403


@pytest.mark.parametrize("url", PAGES + APIS)
def test_every_page_and_twin_works_for_the_admin(client, url):
    logged_in(client)
    assert_served(client.get(url))


@pytest.mark.parametrize(
    "query, expected",
    [
        ("", [5, 4, 3, 2, 1]),
        ("status=2xx", [3, 1]),
        ("status=4xx", [2]),
        ("status=5xx", [4]),
        ("status=error", [5]),
        ("model=gpt-4o", [2]),
        ("path=/v1/emb", [4]),
        ("client=2", [4]),
        ("key=2", [2]),
        ("stream=yes", [3]),
        ("stream=no", [5, 4, 2, 1]),
        ("q=aardvark", [5]),
        ("q=zebra", [3]),
        ("q=question+2", [2]),
        ("q=question&status=2xx", [3, 1]),
        ("q=nothing-like-this", []),
        ("q=%22unbalanced+AND+(", []),
        ("after=3", [5, 4]),
    ],
)
def test_filters_and_search_return_the_right_flows(client, query, expected):
    assert flow_ids(client.get(f"/api/flows?{query}", headers=AUTH)) == expected


def test_time_range_filter_takes_iso_times_as_utc(client):
    since = datetime.fromtimestamp(NOW - 100 + 2.5, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")  # no zone: UTC
    assert flow_ids(client.get(f"/api/flows?since={since}", headers=AUTH)) == [5, 4, 3]
    assert flow_ids(client.get(f"/api/flows?until={NOW - 100 + 2.5}", headers=AUTH)) == [2, 1]
    response = client.get("/api/flows?since=yesterday", headers=AUTH)
    assert response.status_code == 422 and "since" in response.json()["error"]["message"]


def test_the_filter_form_submitted_empty_shows_every_flow(client):
    # The browser sends every field of the form, the unused ones empty.
    logged_in(client)
    form = "q=&status=&model=&path=&client=&key=&stream=&since=&until="
    assert client.get(f"/flows?{form}").status_code == 200
    assert flow_ids(client.get(f"/api/flows?{form}", headers=AUTH)) == [5, 4, 3, 2, 1]
    assert flow_ids(client.get("/api/flows?client=+2+", headers=AUTH)) == [4]


@pytest.mark.parametrize("query", ["client=abc", "key=0", "key=-3", "client=1.5"])
def test_a_key_filter_that_is_not_an_id_is_refused_clearly(client, query):
    response = client.get(f"/api/flows?{query}", headers=AUTH)
    name = query.split("=")[0]
    assert response.status_code == 422 and f"{name} must be a key id" in response.json()["error"]["message"]


def test_keyset_pages_follow_each_other(client):
    first = client.get("/api/flows?limit=2", headers=AUTH).json()
    assert [f["id"] for f in first["flows"]] == [5, 4] and first["next_before"] == 4
    second = client.get(f"/api/flows?limit=2&before={first['next_before']}&status=", headers=AUTH).json()
    assert [f["id"] for f in second["flows"]] == [3, 2]


def test_a_phrase_search_stopped_at_its_budget_says_so_and_goes_on_where_it_stopped(client, monkeypatch):
    monkeypatch.setattr(flows, "CHECK_PAGE", 1)
    monkeypatch.setattr(flows, "PHRASE_CHECK_BUDGET", 2)  # two candidates a page
    first = client.get("/api/flows?q=mini-gpt", headers=AUTH).json()  # both words in most flows, never so
    assert first == {"flows": [], "next_before": 3, "partial": True}
    found, before = [], None
    while True:  # every page of a phrase that matches, the partial ones included
        page = client.get("/api/flows?q=gpt-4o-mini" + (f"&before={before}" if before else ""), headers=AUTH).json()
        found += [f["id"] for f in page["flows"]]
        if not (before := page["next_before"]):
            break
    assert found == [5, 3, 1]
    logged_in(client)
    html = client.get("/flows?q=mini-gpt").text
    assert "only the newest flows that hold them all were checked, down to #3" in html
    assert 'href="/flows?q=mini-gpt&amp;before=3&amp;limit=50">Search older' in html
    assert "Search older" not in client.get("/flows?q=zebra").text


def test_the_page_shows_the_search_and_links_the_filtered_exports(client):
    logged_in(client)
    page = client.get("/flows?q=zebra&status=2xx").text
    assert 'value="zebra"' in page and "/api/flows/export.jsonl?q=zebra&amp;status=2xx" in page
    assert page.count('href="/flows/') == 1


def test_jsonl_export_has_every_filtered_flow_whole(client):
    response = client.get("/api/flows/export.jsonl?status=5xx", headers=AUTH)
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert [(f["id"], f["status"], f["path"]) for f in lines] == [(4, 500, "/v1/embeddings")]
    assert "attachment" in response.headers["content-disposition"]


def test_har_export_is_har_1_2(client, upstream):
    har = client.get("/api/flows/export.har", headers=AUTH).json()
    assert har["log"]["version"] == "1.2" and len(har["log"]["entries"]) == 5
    entry = har["log"]["entries"][-1]  # flow 1, oldest last
    assert entry["request"]["url"] == upstream.url + "/v1/chat/completions"
    assert entry["request"]["postData"]["text"] == ROWS[0]["request_body"]
    assert entry["response"]["status"] == 200 and entry["response"]["content"]["mimeType"] == "application/json"
    assert {"name": "authorization", "value": "[redacted]"} in entry["request"]["headers"]
    for e in har["log"]["entries"]:
        assert set(e) >= {"startedDateTime", "time", "request", "response", "cache", "timings"}
        assert e["timings"]["wait"] >= 0 and e["timings"]["receive"] >= 0


def test_flow_detail_has_attempts_events_and_curl(client):
    detail = client.get("/api/flows/3", headers=AUTH).json()
    assert [(a["attempt"], a["upstream_key_id"], a["status"]) for a in detail["attempt_list"]] == [
        (1, 2, 429),
        (2, 1, 200),
    ]
    assert [e["offset_ms"] for e in detail["events"]] == [0, 12.5]
    assert detail["curl"].startswith("curl -X POST http://127.0.0.1:8080/v1/chat/completions ")
    assert '"authorization: Bearer $KEYROTOR_API_KEY"' in detail["curl"] and "[redacted]" not in detail["curl"]


def test_dashboard_counts_from_rollups(client):
    data = client.get("/api/dashboard", headers=AUTH).json()
    all_time = data["windows"][-1]
    assert (all_time["name"], all_time["requests"], all_time["errors"]) == ("all time", 5, 3)
    assert all_time["success_rate"] == pytest.approx(0.4)
    assert all_time["prompt_tokens"] == 50 and all_time["cost"] == pytest.approx(0.0004)
    assert data["windows"][1]["requests"] == 5  # last hour
    assert {b["id"]: b["requests"] for b in data["breakdowns"]["model"]}["gpt-4o-mini"] == 3
    assert data["keys_by_state"]["active"] == 2
    assert sum(r for _, r, _ in data["per_minute"]) == 5


@pytest.mark.parametrize(
    "query, unit, label, buckets, tip",
    [
        ("", "hour", "last 24 hours", 24, r"\d\d \w\w\w \d\d:00 UTC: 5 requests, 3 errors"),
        ("?range=1h", "minute", "last hour", 60, r"\d\d:\d\d UTC: 5 requests, 3 errors"),
        ("?range=7d", "hour", "last 7 days", 168, r"\d\d \w\w\w \d\d:00 UTC: 5 requests, 3 errors"),
        ("?range=30d", "day", "last 30 days", 30, r"\d\d \w\w\w UTC: 5 requests, 3 errors"),
    ],
)
def test_dashboard_page_draws_its_charts_over_the_chosen_range(client, query, unit, label, buckets, tip):
    logged_in(client)
    page = client.get(f"/dashboard{query}").text
    assert page.count('<figure class="chart"') == 4 and 'data-refresh="/dashboard?' in page
    for caption in (
        f"Requests per {unit}, {label}",
        f"Latency per {unit} (p50, p95), {label}",
        f"Tokens per {unit}, {label}",
        "Estimated spend per day, last 30 days",
    ):
        assert caption in page
    # Axes say what they measure; bars exist for the bucket with requests; errors are hatched, not only red.
    assert page.count('class="axis-title"') == 8 and ">time (UTC)<" in page and ">requests<" in page
    assert 'class="bar ok"' in page and 'class="bar err"' in page and f'fill="url(#hatch-{unit})"' in page
    tips = re.findall(r'data-tip="([^"]+)"', page)
    assert len(tips) == 3 * buckets + 30
    assert any(re.fullmatch(tip, t) for t in tips), tips[:3]


def test_dashboard_names_keys_and_clients_and_links_them(client):
    with_names = client.put("/api/keys/1", json={"name": "Key <one>"}, headers=AUTH)
    assert with_names.status_code == 200 and with_names.json()["label"] == "Key <one> (…0001)"
    data = client.get("/api/dashboard", headers=AUTH).json()
    assert {r["id"]: r["label"] for r in data["breakdowns"]["upstream_key_id"]} == {
        1: "Key <one> (…0001)",
        2: "#2 (…0002)",
    }
    assert {r["id"]: r["label"] for r in data["breakdowns"]["client_key_id"]}[2] == "bob"
    logged_in(client)
    page = client.get("/dashboard").text
    assert '<a href="/keys/1">Key &lt;one&gt; (…0001)</a>' in page and '<a href="/clients#client-2">bob</a>' in page
    assert '<a href="/flows?key=1"' in page


def test_keys_page_adds_in_bulk_then_redirects_so_a_reload_adds_nothing(client):
    csrf = logged_in(client)
    text = "\n".join([KEYS[0], "Spare\tsk-good-pages-ccccccccccccccccccccc0003", "not a key", "# comment"])
    response = client.post("/keys/add", data={"csrf": csrf, "keys": text})
    assert response.status_code == 303
    page = client.get(response.headers["location"]).text
    assert "Added 1, skipped 1 duplicate(s), rejected 1 malformed (line 3)." in page
    assert "…0003" in page and "sk-good-pages-ccc" not in page and 'value="Spare"' in page
    client.get(response.headers["location"])  # what a reload sends: a GET, which adds nothing
    assert len(client.get("/api/keys", headers=AUTH).json()["keys"]) == 3
    many = "\n".join(f"bad {n}" for n in range(30))
    location = client.post("/keys/add", data={"csrf": csrf, "keys": many, "name": "x"}).headers["location"]
    assert "rejected 30 malformed (line 1, 2, 3," in client.get(location).text
    assert "20 and 10 more)." in client.get(location).text


def test_keys_are_renamed_from_the_page_and_the_api(client):
    csrf = logged_in(client)
    response = client.post("/keys/2/edit", data={"csrf": csrf, "name": "  Key 2 "})
    assert response.headers["location"] == "/keys?done=edited&count=1#key-2"
    assert client.get("/api/keys/2", headers=AUTH).json()["name"] == "Key 2"
    assert (
        client.post("/keys/2/edit", data={"csrf": csrf, "name": "Backup", "weight": "3", "back": "key"}).headers[
            "location"
        ]
        == "/keys/2?done=edited"
    )
    key_page = client.get("/keys/2?done=edited").text
    assert "<h1>Backup (…0002)</h1>" in key_page and "Saved." in key_page and 'value="3.0"' in key_page
    assert client.post("/keys/2/edit", data={"name": "Sneaky"}).status_code == 403
    changed = client.put("/api/keys/2", json={"weight": 2.5}, headers=AUTH).json()
    assert (changed["name"], changed["weight"]) == ("Backup", 2.5)  # a field left out stays
    assert client.put("/api/keys/2", json={"name": ""}, headers=AUTH).json()["label"] == "#2 (…0002)"
    assert client.put("/api/keys/2", json={"name": "x" * 65}, headers=AUTH).status_code == 422
    assert client.put("/api/keys/2", json={"weight": 0}, headers=AUTH).status_code == 422
    assert client.put("/api/keys/2", json={"name": "bad\tname"}, headers=AUTH).status_code == 422
    assert client.put("/api/keys/99", json={"name": "x"}, headers=AUTH).status_code == 404
    assert client.put("/api/keys/2", json={"name": "x"}).status_code == 403  # a session without its CSRF header
    assert client.get("/keys/99").status_code == 404


def test_a_cooldown_that_has_passed_is_not_shown_as_until_a_past_time(client, tmp_path):
    conn = db.connect(tmp_path / "kr.db")
    with conn:
        conn.execute("UPDATE upstream_keys SET state = 'cooling', cooldown_until = ?", (NOW - 60,))
        conn.execute("UPDATE upstream_keys SET cooldown_until = ? WHERE id = 2", (NOW + 3600,))
    conn.close()
    keys = client.get("/api/keys", headers=AUTH).json()["keys"]
    assert [k["cooldown_over"] for k in keys] == [True, False]
    logged_in(client)
    page = client.get("/keys").text
    first, second = page.split('id="key-2"')
    assert "cooldown over: the next request tries it" in first and "until " not in first.split('id="key-1"')[1]
    assert "until " in second and "cooldown over" not in second


def test_flows_carry_names_cost_and_first_byte_and_filter_by_what_is_clicked(client):
    client.put("/api/keys/1", json={"name": "Key 1"}, headers=AUTH)
    listed = {f["id"]: f for f in client.get("/api/flows", headers=AUTH).json()["flows"]}
    assert (listed[1]["upstream_key"], listed[1]["client"], listed[4]["client"]) == ("Key 1 (…0001)", "alice", "bob")
    assert listed[1]["cost"] == pytest.approx(0.0001) and listed[1]["first_byte_ms"] == pytest.approx(50, abs=0.1)
    logged_in(client)
    page = client.get("/flows?stream=no").text
    for link in (
        'href="/flows?stream=no&amp;status=429"',
        'href="/flows?stream=no&amp;model=gpt-4o"',
        'href="/flows?stream=no&amp;key=1"',
        'href="/flows?stream=no&amp;client=2"',
        'href="/flows?stream=no&amp;status=error"',
    ):
        assert link in page, link
    assert ">Key 1 (…0001)</a>" in page and ">$0.0001<" in page and ">50 ms<" in page
    assert flow_ids(client.get("/api/flows?status=429", headers=AUTH)) == [2]
    assert flow_ids(client.get("/api/flows?status=500", headers=AUTH)) == [4]
    assert '<option value="429" selected>429 only</option>' in client.get("/flows?status=429").text
    assert client.get("/api/flows?status=42", headers=AUTH).status_code == 422
    detail = client.get("/flows/3").text
    assert '<a href="/keys/2">#2 (…0002)</a>' in detail and '<a href="/keys/1">Key 1 (…0001)</a>' in detail
    assert '<a href="/clients#client-1">alice</a>' in detail


def test_key_actions_from_the_page(client):
    csrf = logged_in(client)
    assert client.post("/keys/2/disable", data={"csrf": csrf}).headers["location"] == "/keys?done=disabled&count=1"
    assert client.get("/api/keys", headers=AUTH).json()["keys"][1]["state"] == "disabled"
    client.post("/keys/2/delete", data={"csrf": csrf})
    assert [k["id"] for k in client.get("/api/keys", headers=AUTH).json()["keys"]] == [1]
    assert "1 key(s) deleted." in client.get("/keys?done=deleted&count=1").text
    assert client.post("/keys/1/explode", data={"csrf": csrf}).status_code == 404


def test_key_api_add_enable_reset(client):
    added = client.post(
        "/api/keys", json={"keys": [KEYS[1], "sk-good-pages-ddddddddddddddddddddd0004", "short"]}, headers=AUTH
    ).json()
    assert added == {"added": [3], "duplicates": 1, "malformed_lines": [3]}
    assert client.post("/api/keys/3/disable", headers=AUTH).json() == {"id": 3, "done": "disable"}
    assert client.post("/api/keys/99/disable", headers=AUTH).status_code == 404
    assert client.post("/api/keys/reset?states=disabled", headers=AUTH).status_code == 422
    assert client.post("/api/keys/reset", headers=AUTH).json() == {"reset": 0}


def test_clients_page_shows_a_new_key_once(client):
    csrf = logged_in(client)
    page = client.post("/clients", data={"csrf": csrf, "name": "carol"}).text
    key = re.search(r'<pre id="new-client-key">(kr-[^<]+)</pre>', page).group(1)
    assert key not in client.get("/clients").text  # never again
    assert "carol" in client.get("/clients").text
    page = client.post("/clients", data={"csrf": csrf, "name": "carol"})
    assert page.status_code == 409 and "already exists" in page.text
    assert client.post("/clients", data={"csrf": csrf, "name": "<b>x</b>"}).status_code == 422


def test_client_api_create_disable_delete(client):
    created = client.post("/api/clients", json={"name": "dave"}, headers=AUTH)
    assert created.status_code == 201 and created.json()["key"].startswith("kr-")
    assert client.post("/api/clients", json={"name": "no/slashes"}, headers=AUTH).status_code == 422
    assert client.post("/api/clients/1/disable", headers=AUTH).json() == {"id": 1, "done": "disable"}
    listed = {c["name"]: c for c in client.get("/api/clients", headers=AUTH).json()["clients"]}
    assert listed["alice"]["enabled"] is False and created.json()["key"] not in json.dumps(listed)
    assert client.post("/api/clients/1/delete", headers=AUTH).status_code == 200
    assert client.post("/api/clients/1/delete", headers=AUTH).status_code == 404


def test_metrics_speak_prometheus_with_the_metrics_token(client):
    response = client.get("/metrics", headers={"Authorization": "Bearer prom-token-123"})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    for line in (
        'keyrotor_requests_total{model="gpt-4o-mini"} 3',
        'keyrotor_upstream_key_requests_total{upstream_key="1"} 4',
        'keyrotor_client_errors_total{client="1"} 2',
        'keyrotor_request_duration_seconds_bucket{le="+Inf"} 5',
        'keyrotor_request_duration_seconds_bucket{le="0.2"} 5',
        'keyrotor_upstream_keys{state="active"} 2',
        'keyrotor_tokens_total{model="gpt-4o",kind="prompt"} 10',
        'keyrotor_upstream_key_tokens_total{upstream_key="2",kind="prompt"} 10',
    ):
        assert line in text, line
    # The metrics token opens /metrics and nothing else.
    assert client.get("/api/flows", headers={"Authorization": "Bearer prom-token-123"}).status_code == 401


def test_metrics_have_no_empty_labels_and_count_attempts_retries_refusals_and_names(client, tmp_path):
    conn = db.connect(tmp_path / "kr.db")
    refusal = [["content-type", "application/json"], ["x-keyrotor-error", "missing_api_key"]]
    write_flows(
        conn,
        [
            row(
                6,
                status=401,
                model=None,
                upstream_key_id=None,
                client_key_id=None,
                attempts=0,
                response_headers=refusal,
            )
        ],
    )
    conn.close()
    client.put("/api/keys/1", json={"name": 'Key "1"'}, headers=AUTH)
    text = client.get("/metrics", headers=AUTH).text
    assert re.findall(r'="",|=""}', text) == []  # no empty label value anywhere
    for line in (
        'keyrotor_requests_total{model="(none)"} 1',
        'keyrotor_upstream_key_requests_total{upstream_key="(none)"} 1',
        'keyrotor_refusals_total{reason="missing_api_key"} 1',
        # Flow 3 was retried (429 on key 2, then 200 on key 1); the others had one attempt each but flow 6.
        'keyrotor_attempts_total{outcome="rate_limited"} 2',  # flow 3's first, and flow 2
        'keyrotor_attempts_total{outcome="success"} 2',
        'keyrotor_attempts_total{outcome="no_response"} 1',
        "keyrotor_retries_total 1",
        'keyrotor_upstream_key_info{upstream_key="1",name="Key \\"1\\" (…0001)"} 1',
        'keyrotor_upstream_key_info{upstream_key="2",name="#2 (…0002)"} 1',
        'keyrotor_client_info{client="2",name="bob"} 1',
    ):
        assert line in text, line
    for value in KEYS:
        assert value not in text


def test_every_page_has_a_favicon_and_it_is_served_without_login(client):
    for url in ("/static/favicon.svg", "/favicon.ico"):
        icon = client.get(url)
        assert icon.status_code == 200 and icon.headers["content-type"].startswith("image/svg+xml")
        assert icon.text.startswith("<svg") and "<script" not in icon.text
    logged_in(client)
    assert '<link rel="icon" href="/static/favicon.svg" type="image/svg+xml">' in client.get("/dashboard").text


def test_the_login_page_says_where_the_admin_key_was_printed_and_how_to_replace_it(client):
    page = client.get("/login").text
    assert "printed once, in the terminal where it first started" in page
    assert "data/keyrotor.db.admin" in page and "KEYROTOR_ADMIN_KEY" in page
