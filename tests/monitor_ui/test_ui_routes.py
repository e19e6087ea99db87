"""The monitor UI as a browser and a script see it: login, sessions, flow pages, the JSON API, escaping."""

from __future__ import annotations

import asyncio
import html
import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urljoin, urlsplit

import httpx
import pytest
from fastapi.testclient import TestClient

from config import load_settings
from core.records import FlowRecord
from monitor_ui.app import create_app
from monitor_ui.auth import SESSION_COOKIE, SESSION_SECONDS
from storage import db, flows

ADMIN = "kra-ui-test-admin-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
BASE = "http://testserver"
T0 = 1_750_000_000.0

XSS_SCRIPT = "<script>alert(1)</script>"
XSS_IMG = "<img src=x onerror=alert(1)>"

CHAT_REQUEST = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hi"}]}
CHAT_RESPONSE = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi there"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12},
}


def sse(*pieces: str) -> str:
    """A streamed chat completion body carrying `pieces` as content deltas."""
    events = [{"id": "c1", "choices": [{"index": 0, "delta": {"role": "assistant"}}]}]
    events += [{"id": "c1", "choices": [{"index": 0, "delta": {"content": p}}]} for p in pieces]
    events.append({"id": "c1", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"


STREAM_PIECES = ("Hel", "lo, ", "streamed ", "world")
STREAM_TEXT = "".join(STREAM_PIECES)


def flow_row(n: int, **overrides: Any) -> dict[str, Any]:
    """A complete stored flow row; `n` makes its ids and timestamps distinct."""
    started = T0 + n
    row = {
        "flow_id": f"mitm-{n:04d}",
        "started_at": started,
        "first_byte_at": started + 0.25,
        "ended_at": started + 0.5,
        "duration_ms": 500.0,
        "method": "POST",
        "path": f"/v1/chat/completions?n={n}",
        "status": 200,
        "model": "gpt-4o-mini",
        "stream": 0,
        "client_key_id": None,
        "upstream_key_id": None,
        "attempts": 1,
        "prompt_tokens": 9,
        "completion_tokens": 3,
        "total_tokens": 12,
        "cost": None,
        "client_addr": "127.0.0.1",
        "error": None,
        "request_headers": [["content-type", "application/json"], ["x-request-n", str(n)]],
        "response_headers": [["content-type", "application/json"]],
        "request_body": json.dumps(CHAT_REQUEST, separators=(",", ":")),
        "request_body_size": 80,
        "request_body_truncated": 0,
        "response_body": json.dumps(CHAT_RESPONSE, separators=(",", ":")),
        "response_body_size": 200,
        "response_body_truncated": 0,
        "chunk_times": None,
    }
    row.update(overrides)
    return row


def streamed_row(n: int) -> dict[str, Any]:
    body = sse(*STREAM_PIECES)
    return flow_row(
        n,
        stream=1,
        first_byte_at=T0 + n + 0.125,
        response_body=body,
        response_body_size=len(body),
        response_headers=[["content-type", "text/event-stream"]],
        request_body=json.dumps({**CHAT_REQUEST, "stream": True}),
        chunk_times=[[0, 60], [10, 60], [20, 60], [30, 60], [40, 60], [50, 14]],
    )


# Ids are assigned in insertion order: 1 is a plain JSON completion, 2 is streamed, 3..7 are plain.
SEEDED = [flow_row(1), streamed_row(2), *(flow_row(n) for n in range(3, 8))]
PLAIN_ID, STREAMED_ID, UNKNOWN_ID = 1, 2, 999_999

EVIL_TEXT = f"{XSS_SCRIPT} {XSS_IMG}"
EVIL_ROWS = [
    flow_row(
        1,
        path=f"/v1/chat/completions/{XSS_SCRIPT}{XSS_IMG}",
        model=EVIL_TEXT,
        error=EVIL_TEXT,
        client_addr=XSS_IMG,
        request_headers=[["x-evil", EVIL_TEXT], [XSS_SCRIPT, "name too"]],
        response_headers=[["x-evil", EVIL_TEXT]],
        request_body=json.dumps({"model": EVIL_TEXT, "messages": [{"role": "user", "content": EVIL_TEXT}]}),
        response_body=json.dumps({"choices": [{"message": {"content": EVIL_TEXT}}]}),
    ),
    flow_row(2, path=f"/v1/{XSS_IMG}", request_body=EVIL_TEXT, response_body=EVIL_TEXT),  # not JSON
    {**streamed_row(3), "model": EVIL_TEXT, "response_body": sse(XSS_SCRIPT, " ", XSS_IMG)},
]


@pytest.fixture(autouse=True)
def admin_key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # storage.secrets reads these from os.environ, not from the settings.
    monkeypatch.setenv("KEYROTOR_ADMIN_KEY", ADMIN)
    monkeypatch.delenv("KEYROTOR_SECRET", raising=False)


@pytest.fixture
def make_client(tmp_path: Path) -> Iterator[Callable[..., TestClient]]:
    """Build the UI on a fresh database holding `rows`; the client does not follow redirects."""
    clients: list[TestClient] = []

    def make(rows: list[dict[str, Any]], raise_server_exceptions: bool = True) -> TestClient:
        path = tmp_path / f"kr{len(clients)}.db"
        settings = load_settings(overrides={"storage.path": str(path)}, environ={"KEYROTOR_ADMIN_KEY": ADMIN})
        db.ensure_database(settings.storage_path)
        conn = db.connect(settings.storage_path)
        try:
            with conn:
                flows.insert_batch(conn, [FlowRecord(**r) for r in rows])
        finally:
            conn.close()
        client = TestClient(
            create_app(settings), follow_redirects=False, raise_server_exceptions=raise_server_exceptions
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def client(make_client) -> TestClient:
    return make_client(SEEDED)


def log_in(client: TestClient) -> None:
    response = client.post("/login", data={"admin_key": ADMIN})
    assert response.status_code == 303, response.text
    assert client.cookies.get(SESSION_COOKIE)


@pytest.fixture
def browser(client: TestClient) -> TestClient:
    """A client holding a session cookie, as a browser after logging in."""
    log_in(client)
    return client


def is_openai_error(response, status: int) -> bool:
    body = response.json()
    error = body.get("error")
    return (
        set(body) == {"error"}
        and isinstance(error, dict)
        and {"message", "type", "code"} <= set(error)
        and isinstance(error["message"], str)
        and error["message"] != ""
        and error["code"] == str(status)
    )


def csrf_of(page: str) -> str:
    match = re.search(r'<input type="hidden" name="csrf" value="([^"]+)">', page)
    assert match, "no csrf field on the page"
    return match.group(1)


def pre_blocks(page: str) -> list[str]:
    """The text of every <pre> on a page, unescaped as the browser would show it."""
    return [html.unescape(m) for m in re.findall(r"<pre[^>]*>(.*?)</pre>", page, flags=re.S)]


def location_target(response) -> tuple[str, dict[str, list[str]]]:
    """The redirect target's path and query, resolved like a browser would."""
    parts = urlsplit(urljoin(BASE + "/", response.headers["location"]))
    assert f"{parts.scheme}://{parts.netloc}" == BASE, f"redirect leaves the site: {response.headers['location']}"
    return parts.path, parse_qs(parts.query)


# ---------------------------------------------------------------------------------------------------------------
# 1. Who may see what without logging in


@pytest.mark.parametrize(
    "url, next_path",
    [
        ("/flows", "/flows"),
        (f"/flows/{PLAIN_ID}", f"/flows/{PLAIN_ID}"),
        (f"/flows/{STREAMED_ID}", f"/flows/{STREAMED_ID}"),
    ],
)
def test_pages_redirect_to_login_without_a_session(client, url, next_path):
    response = client.get(url)
    assert response.status_code == 303
    path, query = location_target(response)
    assert path == "/login"
    assert query["next"] == [next_path]
    assert "Hi there" not in response.text and "gpt-4o-mini" not in response.text


@pytest.mark.parametrize("url", ["/api/flows", f"/api/flows/{PLAIN_ID}", f"/api/flows/{UNKNOWN_ID}"])
@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer kra-not-the-admin-key"},
        {"Authorization": "Bearer "},
        {"Authorization": f"Basic {ADMIN}"},
        {"Authorization": ADMIN},
        {"Cookie": f"{SESSION_COOKIE}=9999999999.deadbeef"},
    ],
    ids=["none", "wrong-bearer", "empty-bearer", "basic-scheme", "no-scheme", "forged-cookie"],
)
def test_api_refuses_without_admin_credentials(make_client, url, headers):
    client = make_client(SEEDED)
    response = client.get(url, headers=headers)
    assert response.status_code == 401
    assert is_openai_error(response, 401)
    assert "gpt-4o-mini" not in response.text


def test_health_needs_no_login(client):
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_login_page_is_reachable_without_a_session(client):
    response = client.get("/login", params={"next": "/flows/2"})
    assert response.status_code == 200
    assert 'name="admin_key"' in response.text
    assert '<input type="hidden" name="next" value="/flows/2">' in response.text
    assert 'name="csrf"' not in response.text  # no logout button for a logged-out visitor


def test_root_leads_to_the_dashboard(client):
    response = client.get("/")
    assert response.status_code == 303
    assert response.headers["location"] == "/dashboard"


def test_login_redirect_keeps_the_query_of_the_page_asked_for(client):
    response = client.get("/flows", params={"before": 5, "limit": 3})
    assert response.status_code == 303
    _, query = location_target(response)
    assert query["next"] == ["/flows?before=5&limit=3"]


# ---------------------------------------------------------------------------------------------------------------
# 2. Logging in


def test_wrong_admin_key_is_refused_and_the_page_says_so(client):
    response = client.post("/login", data={"admin_key": "kra-wrong"})
    assert response.status_code == 401
    assert "That is not the admin key." in response.text
    assert 'name="admin_key"' in response.text  # the form again, to retry
    assert "set-cookie" not in response.headers
    assert client.get("/flows").status_code == 303


def test_empty_admin_key_is_refused(client):
    response = client.post("/login", data={"admin_key": ""})
    assert response.status_code == 401
    assert "set-cookie" not in response.headers


def test_right_admin_key_sets_a_strict_httponly_session_cookie(client):
    response = client.post("/login", params={"next": f"/flows/{STREAMED_ID}"}, data={"admin_key": ADMIN})
    assert response.status_code == 303
    assert response.headers["location"] == f"/flows/{STREAMED_ID}"
    cookies = response.headers.get_list("set-cookie")
    assert len(cookies) == 1
    raw = cookies[0]
    attributes = [part.strip().lower() for part in raw.split(";")]
    assert raw.startswith(f"{SESSION_COOKIE}=")
    assert "httponly" in attributes
    assert "samesite=strict" in attributes
    assert f"max-age={SESSION_SECONDS}" in attributes
    assert "path=/" in attributes
    # The session works for both pages and the API.
    assert client.get("/flows").status_code == 200
    assert client.get(f"/api/flows/{PLAIN_ID}").status_code == 200


def test_admin_key_is_accepted_with_surrounding_whitespace(client):
    response = client.post("/login", data={"admin_key": f"  {ADMIN}\n"})
    assert response.status_code == 303


def test_browser_login_returns_to_the_page_first_asked_for(client):
    wanted = f"/flows/{STREAMED_ID}"
    to_login = client.get(wanted)
    form = client.get(to_login.headers["location"]).text
    assert 'action="/login"' in form
    hidden_next = re.search(r'name="next" value="([^"]*)"', form).group(1)
    response = client.post("/login", data={"admin_key": ADMIN, "next": hidden_next})
    assert response.status_code == 303
    assert response.headers["location"] == wanted


def post_login(client: TestClient, next_url: str, where: str):
    if where == "query":
        return client.post("/login", params={"next": next_url}, data={"admin_key": ADMIN})
    return client.post("/login", data={"admin_key": ADMIN, "next": next_url})


@pytest.mark.parametrize(
    "next_url",
    [
        "//evil.example",
        "//evil.example/flows",
        "https://evil.example",
        "https://evil.example/flows",
        "http:evil.example",
        "evil.example",
        "javascript:alert(1)",
        "",
    ],
)
@pytest.mark.parametrize("where", ["query", "form"])
def test_off_site_next_redirects_to_the_dashboard(client, next_url, where):
    response = post_login(client, next_url, where)
    assert response.status_code == 303
    assert response.headers["location"] == "/dashboard"


@pytest.mark.parametrize("next_url", ["/\\evil.example", "/\t/evil.example", "/\n/evil.example"])
@pytest.mark.parametrize("where", ["query", "form"])
def test_next_that_browsers_could_read_as_off_site_stays_on_site(client, next_url, where):
    # Browsers read "\\" as "/" and drop tabs and newlines: a raw "/\\evil.example" would leave the site.
    response = post_login(client, next_url, where)
    assert response.status_code == 303
    location = response.headers["location"]
    assert not {"\\", "\t", "\n"} & set(location)
    location_target(response)  # resolves on this site


@pytest.mark.parametrize("next_url", ["//evil.example", "https://evil.example/x"])
def test_login_form_never_carries_an_off_site_next(client, next_url):
    page = client.get("/login", params={"next": next_url}).text
    assert '<input type="hidden" name="next" value="/dashboard">' in page
    assert "evil.example" not in page


@pytest.mark.parametrize(
    "origin, allowed",
    [
        ("https://evil.example", False),
        ("http://evil.example", False),
        ("https://testserver", False),  # same host, other scheme
        ("http://testserver:8081", False),  # same host, other port
        ("null", False),  # sandboxed frames and some redirects send this
        ("http://testserver", True),
        (None, True),  # non-browser clients send no Origin
    ],
)
def test_cross_site_login_is_refused(client, origin, allowed):
    headers = {"Origin": origin} if origin else {}
    response = client.post("/login", data={"admin_key": ADMIN}, headers=headers)
    if allowed:
        assert response.status_code == 303
        assert client.cookies.get(SESSION_COOKIE)
    else:
        assert response.status_code == 403
        assert is_openai_error(response, 403)
        assert "set-cookie" not in response.headers
        assert client.get("/flows").status_code == 303


# ---------------------------------------------------------------------------------------------------------------
# 3. The JSON API with the admin key


def test_api_lists_newest_first(client):
    response = client.get("/api/flows", headers=AUTH)
    assert response.status_code == 200
    body = response.json()
    assert [f["id"] for f in body["flows"]] == [7, 6, 5, 4, 3, 2, 1]
    assert [f["flow_id"] for f in body["flows"]] == [f"mitm-{n:04d}" for n in range(7, 0, -1)]
    assert body["next_before"] is None
    newest = body["flows"][0]
    assert newest["path"] == "/v1/chat/completions?n=7"
    assert newest["started_at"].endswith("Z")
    assert newest["stream"] is False
    assert body["flows"][-2]["stream"] is True
    # The list leaves the (possibly large) bodies and headers out.
    assert not {"request_body", "response_body", "request_headers", "response_headers"} & set(newest)


@pytest.mark.parametrize("limit", [1, 2, 3, 4, 6, 7, 8])
def test_api_keyset_pagination_covers_every_row_once(client, limit):
    seen: list[int] = []
    params: dict[str, int] = {"limit": limit}
    for _ in range(20):
        body = client.get("/api/flows", params=params, headers=AUTH).json()
        page = [f["id"] for f in body["flows"]]
        assert len(page) <= limit
        if seen and page:
            assert page[0] == seen[-1] - 1  # continues exactly where the previous page ended
        seen += page
        if body["next_before"] is None:
            break
        assert body["next_before"] == page[-1]
        params = {"limit": limit, "before": body["next_before"]}
    else:
        pytest.fail("pagination never ended")
    assert seen == [7, 6, 5, 4, 3, 2, 1]


def test_api_pages_of_three_over_seven_rows(client):
    first = client.get("/api/flows", params={"limit": 3}, headers=AUTH).json()
    assert [f["id"] for f in first["flows"]] == [7, 6, 5] and first["next_before"] == 5
    second = client.get("/api/flows", params={"limit": 3, "before": 5}, headers=AUTH).json()
    assert [f["id"] for f in second["flows"]] == [4, 3, 2] and second["next_before"] == 2
    last = client.get("/api/flows", params={"limit": 3, "before": 2}, headers=AUTH).json()
    assert [f["id"] for f in last["flows"]] == [1] and last["next_before"] is None


@pytest.mark.parametrize(
    "params",
    [{"limit": 0}, {"limit": 501}, {"limit": -1}, {"limit": "ten"}, {"before": 0}, {"before": "x"}],
    ids=["limit-0", "limit-501", "limit-negative", "limit-text", "before-0", "before-text"],
)
def test_api_rejects_out_of_range_paging(client, params):
    response = client.get("/api/flows", params=params, headers=AUTH)
    assert response.status_code == 422


@pytest.mark.parametrize("limit", [1, 500])
def test_api_accepts_limits_at_the_bounds(client, limit):
    response = client.get("/api/flows", params={"limit": limit}, headers=AUTH)
    assert response.status_code == 200
    assert len(response.json()["flows"]) == min(limit, len(SEEDED))


def test_api_validation_errors_are_openai_shaped(client):
    response = client.get("/api/flows", params={"limit": 0}, headers=AUTH)
    assert response.status_code == 422
    assert is_openai_error(response, 422)


def test_api_flow_detail_of_a_plain_completion(client):
    response = client.get(f"/api/flows/{PLAIN_ID}", headers=AUTH)
    assert response.status_code == 200
    flow = response.json()
    assert flow["id"] == PLAIN_ID
    assert flow["request_headers"] == [["content-type", "application/json"], ["x-request-n", "1"]]
    assert flow["response_headers"] == [["content-type", "application/json"]]
    assert json.loads(flow["request_body"]) == CHAT_REQUEST
    assert json.loads(flow["response_body"]) == CHAT_RESPONSE
    assert flow["stream"] is False
    assert flow["streamed_text"] is None
    assert flow["chunk_times"] == []
    assert flow["time_to_first_byte_ms"] == 250.0
    assert flow["started_at"].endswith("Z") and flow["ended_at"].endswith("Z")


def test_api_flow_detail_reassembles_streamed_text(client):
    flow = client.get(f"/api/flows/{STREAMED_ID}", headers=AUTH).json()
    assert flow["stream"] is True
    assert flow["streamed_text"] == STREAM_TEXT
    assert flow["time_to_first_byte_ms"] == 125.0
    assert flow["response_headers"] == [["content-type", "text/event-stream"]]
    assert flow["chunk_times"] == [[0, 60], [10, 60], [20, 60], [30, 60], [40, 60], [50, 14]]
    assert flow["response_body"] == sse(*STREAM_PIECES)  # the raw events are kept as well


def test_api_unknown_flow_is_an_openai_shaped_404(client):
    response = client.get(f"/api/flows/{UNKNOWN_ID}", headers=AUTH)
    assert response.status_code == 404
    assert is_openai_error(response, 404)
    assert str(UNKNOWN_ID) in response.json()["error"]["message"]


def test_api_works_with_a_session_cookie_too(browser):
    assert [f["id"] for f in browser.get("/api/flows", params={"limit": 2}).json()["flows"]] == [7, 6]


# ---------------------------------------------------------------------------------------------------------------
# 4. The HTML pages after logging in


def test_flow_list_page_links_every_flow_newest_first(browser):
    response = browser.get("/flows")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    links = [int(i) for i in re.findall(r'<a href="/flows/(\d+)"', response.text)]
    assert links == [7, 6, 5, 4, 3, 2, 1]
    for n in range(1, 8):
        assert f"/<wbr>v1/<wbr>chat/<wbr>completions?n={n}" in response.text  # wraps after a slash
    assert "Older" not in response.text  # everything fits on one page


def test_flow_list_page_offers_the_next_page(browser):
    page = browser.get("/flows", params={"limit": 3}).text
    assert [int(i) for i in re.findall(r'<a href="/flows/(\d+)"', page)] == [7, 6, 5]
    older = re.search(r'<a href="(/flows\?before=[^"]+)">Older', page)
    assert older, "no link to older flows"
    next_page = browser.get(html.unescape(older.group(1))).text
    assert [int(i) for i in re.findall(r'<a href="/flows/(\d+)"', next_page)] == [4, 3, 2]


def test_flow_list_page_of_an_empty_database(make_client):
    client = make_client([])
    log_in(client)
    page = client.get("/flows").text
    assert "No requests recorded yet" in page


def test_flow_page_pretty_prints_json_bodies(browser):
    response = browser.get(f"/flows/{PLAIN_ID}")
    assert response.status_code == 200
    blocks = pre_blocks(response.text)
    assert json.dumps(CHAT_REQUEST, indent=2) in blocks
    assert json.dumps(CHAT_RESPONSE, indent=2) in blocks
    assert "x-request-n" in response.text
    assert "(250.0 ms)" in response.text  # time to first byte


def test_flow_page_shows_the_reassembled_streamed_text(browser):
    response = browser.get(f"/flows/{STREAMED_ID}")
    assert response.status_code == 200
    streamed = re.search(r'<pre class="body streamed-text">(.*?)</pre>', response.text, flags=re.S)
    assert streamed, "no reassembled assistant text"
    assert html.unescape(streamed.group(1)) == STREAM_TEXT
    blocks = pre_blocks(response.text)
    events = [e for e in sse(*STREAM_PIECES).split("\n\n") if e]
    assert all(e in blocks for e in events)  # each raw event below it, in its own row
    assert "6 reads" in response.text
    # Each event with the arrival time of the read that completed it (reads of 60 bytes, 10 ms apart).
    offsets = re.findall(
        r'<td class="num">\+([\d.]+) ms</td><td class="event-type">[^<]*</td><td class="event-data"><pre>',
        response.text,
    )
    assert len(offsets) == len(events) and offsets == sorted(offsets, key=float) and offsets[0] == "10.0"
    # Collapsed until asked for: the reassembled text is what a reader wants first.
    assert re.search(r'<details class="raw-events">\s*<summary>Raw events \(7\)', response.text)


def test_flow_page_of_an_unknown_flow_is_404(browser):
    assert browser.get(f"/flows/{UNKNOWN_ID}").status_code == 404


# ---------------------------------------------------------------------------------------------------------------
# 5. Captured traffic is attacker-controlled: it is escaped, and the CSP forbids inline script anyway


@pytest.fixture
def evil_browser(make_client) -> TestClient:
    client = make_client(EVIL_ROWS)
    log_in(client)
    return client


@pytest.mark.parametrize("url", ["/flows", "/flows/1", "/flows/2", "/flows/3"])
def test_captured_markup_is_escaped(evil_browser, url):
    response = evil_browser.get(url)
    assert response.status_code == 200
    page = response.text.replace('<script src="/static/app.js" defer></script>', "")  # our own, from /static
    assert "<script" not in page.lower()
    assert "<img" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page


def test_evil_flow_detail_shows_the_text_as_written(evil_browser):
    page = evil_browser.get("/flows/3").text
    streamed = re.search(r'<pre class="body streamed-text">(.*?)</pre>', page, flags=re.S)
    assert html.unescape(streamed.group(1)) == f"{XSS_SCRIPT} {XSS_IMG}"
    page = evil_browser.get("/flows/1").text
    header_cells = [html.unescape(c) for c in re.findall(r"<td>(.*?)</td>", page)]
    assert EVIL_TEXT in header_cells


def test_evil_flow_json_is_returned_verbatim(evil_browser):
    response = evil_browser.get("/api/flows/1")
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["model"] == EVIL_TEXT


CSP_REQUESTS = [
    ("GET", "/health", None, 200),
    ("GET", "/login", None, 200),
    ("POST", "/login", "wrong-key", 401),
    ("GET", "/flows", None, 303),
    ("GET", "/api/flows", None, 401),
    ("GET", "/flows", "session", 200),
    ("GET", "/flows/1", "session", 200),
    ("GET", "/flows/2", "session", 200),
    ("GET", "/api/flows", "bearer", 200),
    ("GET", "/api/flows/1", "bearer", 200),
    ("GET", f"/api/flows/{UNKNOWN_ID}", "bearer", 404),
    ("GET", "/api/flows?limit=0", "bearer", 422),
    ("GET", "/static/style.css", None, 200),
    ("GET", "/no-such-page", None, 404),
    ("POST", "/logout", "session", 403),
]


@pytest.mark.parametrize("method, url, auth, status", CSP_REQUESTS)
def test_every_response_forbids_inline_script(make_client, method, url, auth, status):
    client = make_client(EVIL_ROWS)
    headers = {}
    data = None
    if auth == "session":
        log_in(client)
    elif auth == "bearer":
        headers = AUTH
    elif auth == "wrong-key":
        data = {"admin_key": "kra-wrong"}
    response = client.request(method, url, headers=headers, data=data)
    assert response.status_code == status
    csp = response.headers.get("content-security-policy", "")
    directives = {d.split()[0]: d.split()[1:] for d in csp.split(";") if d.strip()}
    assert directives.get("script-src") == ["'self'"]
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert directives.get("default-src") == ["'none'"]
    assert response.headers.get("x-content-type-options") == "nosniff"


# ---------------------------------------------------------------------------------------------------------------
# 6. Logging out


@pytest.mark.parametrize(
    "form",
    [{}, {"csrf": ""}, {"csrf": "0" * 64}, {"csrf": "not-a-token"}],
    ids=["missing", "empty", "wrong-hex", "garbage"],
)
def test_logout_without_the_csrf_token_is_refused(browser, form):
    response = browser.post("/logout", data=form)
    assert response.status_code == 403
    assert is_openai_error(response, 403)
    assert "set-cookie" not in response.headers
    assert browser.get("/flows").status_code == 200  # still logged in


def test_logout_with_the_csrf_token_ends_the_session(browser):
    token = csrf_of(browser.get("/flows").text)
    assert csrf_of(browser.get(f"/flows/{PLAIN_ID}").text) == token  # every page carries the same token
    response = browser.post("/logout", data={"csrf": token})
    assert response.status_code == 303
    assert response.headers["location"] == "/login"
    cleared = response.headers["set-cookie"].lower()
    assert cleared.startswith(f"{SESSION_COOKIE}=")
    assert "max-age=0" in cleared
    assert browser.cookies.get(SESSION_COOKIE) is None
    assert browser.get("/flows").status_code == 303
    assert browser.get("/api/flows").status_code == 401


def test_logout_ends_the_session_on_the_server_too(browser):
    """A copy of the cookie (another tab, a stolen one) stops working when its session logs out."""
    session = browser.cookies.get(SESSION_COOKIE)
    copy = TestClient(browser.app, follow_redirects=False)
    copy.cookies.set(SESSION_COOKIE, session)
    assert copy.get("/api/flows").status_code == 200
    assert browser.post("/logout", data={"csrf": csrf_of(browser.get("/flows").text)}).status_code == 303
    assert copy.get("/api/flows").status_code == 401
    assert copy.get("/flows").status_code == 303
    copy.close()


def test_csrf_token_of_another_session_is_refused(make_client):
    alice = make_client(SEEDED)
    log_in(alice)
    alice_token = csrf_of(alice.get("/flows").text)
    # A second login gets a session with a different expiry, hence a different token.
    bob = TestClient(alice.app, follow_redirects=False)
    later = alice.app.state.signer.new_session(now=time.time() + 60)
    bob.cookies.set(SESSION_COOKIE, later)
    assert bob.get("/flows").status_code == 200
    assert bob.post("/logout", data={"csrf": alice_token}).status_code == 403
    bob.close()


def test_logout_with_a_non_ascii_csrf_token_is_refused(make_client):
    client = make_client(SEEDED, raise_server_exceptions=False)
    log_in(client)
    response = client.post("/logout", data={"csrf": "é"})
    assert response.status_code == 403


# ---------------------------------------------------------------------------------------------------------------
# 7. Sessions are signed


def _expired(client: TestClient) -> str:
    return client.app.state.signer.new_session(now=time.time() - SESSION_SECONDS - 60)


def _tampered(client: TestClient) -> str:
    expires, _, signature = client.app.state.signer.new_session().partition(".")
    return f"{int(expires) + 3600}.{signature}"


def _other_installation(client: TestClient) -> str:
    return f"{int(time.time()) + 3600}.{'ab' * 32}"


FORGERS = {"expired": _expired, "tampered": _tampered, "other-installation": _other_installation}


async def raw_cookie_gets(app, cookie: bytes, urls: list[str]) -> list[httpx.Response]:
    """GET each url with this exact Cookie header, its bytes passed through as a real server would.

    (TestClient re-encodes header values as UTF-8, and its cookie jar refuses odd values.)
    """
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url=BASE, follow_redirects=False) as client:
        return [await client.get(url, headers={"cookie": cookie}) for url in urls]


@pytest.mark.parametrize(
    "cookie",
    [
        b"9999999999.deadbeef",
        b"9999999999." + b"0" * 64,
        b"garbage",
        b".",
        b"-1.deadbeef",
        b"1.deadbeef",
        "expired",
        "tampered",
        "other-installation",
        pytest.param(b"9999999999.\xc3\xa9", id="non-ascii"),
        pytest.param(b"9" * 5000 + b".ab", id="huge-expiry"),
        pytest.param(b"\xb2.ab", id="superscript-two"),
    ],
)
def test_forged_session_cookie_is_not_accepted(make_client, cookie):
    client = make_client(SEEDED)
    value = FORGERS[cookie](client).encode() if isinstance(cookie, str) else cookie
    page, api = asyncio.run(raw_cookie_gets(client.app, b"keyrotor_session=" + value, ["/flows", "/api/flows"]))
    assert page.status_code == 303
    assert location_target(page)[0] == "/login"
    assert api.status_code == 401
    assert is_openai_error(api, 401)


def test_a_genuine_session_from_the_signer_is_accepted(client):
    client.cookies.set(SESSION_COOKIE, client.app.state.signer.new_session())
    assert client.get("/flows").status_code == 200


def test_sessions_end_when_the_admin_key_changes(make_client, monkeypatch):
    client = make_client(SEEDED)
    log_in(client)
    session = client.cookies.get(SESSION_COOKIE)
    monkeypatch.setenv("KEYROTOR_ADMIN_KEY", "kra-a-brand-new-admin-key-000000000000")
    settings = load_settings(overrides={"storage.path": str(client.app.state.settings.db_path)}, environ={})
    relaunched = TestClient(create_app(settings), follow_redirects=False)
    relaunched.cookies.set(SESSION_COOKIE, session)
    assert relaunched.get("/flows").status_code == 303
    relaunched.close()
