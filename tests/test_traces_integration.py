"""Trace probes end to end (docs/traces.md): a real proxy, a fake relay station that fetches the image
URLs it finds (from its own address, with its own user agent) or does not, the trace listener on a
port of its own, the admin API and `run.py traces`.

Invariants: a trace's request goes through the proxy under the "traces" client, pinned to the group
asked for; every fetch of a trace's image is recorded with its address and user agent, and nothing
else: the listener answers no other path, writes nothing for an unknown id, limits each address
and keeps a bounded number of fetches per trace; every trace API needs the admin credential."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from config import Settings, load_settings
from core import traces as core_traces
from monitor_ui import tracer
from monitor_ui.trace_listener import listener_for
from storage import db
from storage import traces as trace_store
from tests.conftest import ADMIN_KEY, Keyrotor, free_port, wait_for
from tests.fake_upstream import SYSTEM_FINGERPRINT, FakeUpstream

RELAY_KEY = "sk-good-relay-aaaaaaaaaaaaaaaaaaaaaa01"
RELAY_AGENT = "RelayFetcher/2.1 (+https://relay.example)"
MODEL = "gpt-4o-mini"


@pytest.fixture
def relay() -> Iterator[FakeUpstream]:
    with FakeUpstream(models={MODEL}).start() as up:
        up.fetch_images_as = RELAY_AGENT
        yield up


@pytest.fixture
def kr(keyrotor: Keyrotor, relay: FakeUpstream) -> Keyrotor:
    """relay/cheap (the fake relay, gpt-4o-mini) ahead of default/default; the proxy running."""
    keyrotor.add_upstream_serving("relay/cheap", relay.url + "/v1", MODEL, RELAY_KEY)
    keyrotor.add_keys("sk-good-default-cccccccccccccccccccc03")
    keyrotor.start_proxy()
    return keyrotor


@pytest.fixture
def trace_port() -> int:
    return free_port()


def settings_of(kr: Keyrotor, trace_port: int, **more: str) -> Settings:
    overrides = {
        "storage.path": str(kr.db_path),
        "proxy.port": str(kr.proxy_port),
        "trace.port": str(trace_port),
        "trace.grace_seconds": "0",
        **{k.replace("__", "."): v for k, v in more.items()},
    }
    return load_settings(overrides=overrides, environ={})


class Listening:
    """The trace listener of `settings`, served by an event loop in a thread of its own."""

    def __init__(self, settings: Settings) -> None:
        self.listener = listener_for(settings)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.listener.start(), self.loop).result(10)
        self.url = f"http://127.0.0.1:{settings.trace.port}"

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.listener.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def listening(kr: Keyrotor, trace_port: int) -> Iterator[Listening]:
    served = Listening(settings_of(kr, trace_port, trace__ip_rpm="1000"))
    yield served
    served.close()


def run_trace(settings: Settings, group: str = "relay/cheap", model: str = MODEL) -> dict:
    conn = db.connect(settings.storage_path)
    try:
        trace, client_id = tracer.start(conn, settings, group, model)
    finally:
        conn.close()
    asyncio.run(tracer.complete(settings, trace, client_id))
    return read_trace(settings, int(trace["id"]))


def read_trace(settings: Settings, row_id: int) -> dict:
    conn = db.connect(settings.storage_path, readonly=True)
    try:
        return tracer.described(conn, trace_store.get(conn, row_id) or {}, settings)
    finally:
        conn.close()


def count(kr: Keyrotor, table: str) -> int:
    return kr.query(f"SELECT count(*) AS n FROM {table}")[0]["n"]


def test_a_relay_that_fetches_the_image_is_recorded_with_its_address_and_user_agent(
    kr: Keyrotor, relay: FakeUpstream, upstream: FakeUpstream, listening: Listening, trace_port: int
):
    trace = run_trace(settings_of(kr, trace_port))
    verdict = trace["verdict"]
    assert verdict["state"] == "fetched" and verdict["summary"] == "fetched by 1 distinct address"
    assert [(f["address"], f["user_agents"], f["fetches"]) for f in verdict["fetchers"]] == [
        ("127.0.0.2", [RELAY_AGENT], 1)
    ]
    [fetch] = trace["fetches"]
    assert ["x-relay-note", "fetched by the fake relay"] in fetch["headers"]
    assert fetch["user_agent"] == RELAY_AGENT and 0 <= fetch["delay_seconds"] < 30
    assert relay.image_fetches == [(trace["image_url"], 200)]  # served a real image
    # The request went through the proxy, to the group asked for, under the built-in "traces" client.
    sent = json.loads(relay.received[-1].body)
    image = sent["messages"][0]["content"][1]["image_url"]["url"]
    trace_id = parse_qs(urlsplit(image).query)["traceid"][0]
    assert image.startswith(f"http://127.0.0.1:{trace_port}/api/img?traceid=") and len(trace_id) >= 32
    assert relay.received[-1].key == RELAY_KEY and not upstream.received
    assert trace["status"] == 200 and trace["answer_model"] == MODEL
    assert verdict["system_fingerprint"] == SYSTEM_FINGERPRINT and verdict["model_differs"] is False
    assert verdict["mentions_image"] is False  # the fake answers "Hello from the fake upstream..."
    flow = wait_for(lambda: kr.query("SELECT f.id, c.name FROM flows f JOIN clients c ON c.id = f.client_id"))
    assert [row["name"] for row in flow] == [tracer.TRACES_CLIENT]


def test_traces_run_at_once_each_link_the_flow_the_proxy_named(kr: Keyrotor, listening: Listening, trace_port: int):
    settings = settings_of(kr, trace_port)

    async def both() -> list[dict]:
        conn = db.connect(settings.storage_path)
        try:
            started = [tracer.start(conn, settings, "relay/cheap", MODEL) for _ in range(2)]
        finally:
            conn.close()
        await asyncio.gather(*(tracer.complete(settings, trace, client) for trace, client in started))
        return [read_trace(settings, int(trace["id"])) for trace, _ in started]

    traces = asyncio.run(both())
    linked = [t["flow_id"] for t in traces]
    assert None not in linked and len(set(linked)) == 2  # one flow each, not the first flow after both were sent
    for flow_id in linked:
        [row] = kr.query("SELECT c.name FROM flows f JOIN clients c ON c.id = f.client_id WHERE f.id = ?", (flow_id,))
        assert row["name"] == tracer.TRACES_CLIENT


def test_a_relay_that_does_not_fetch_gives_no_fetch_and_a_swapped_model_shows(
    kr: Keyrotor, relay: FakeUpstream, listening: Listening, trace_port: int
):
    relay.fetch_images_as = None
    relay.answer_model = "gpt-3.5-turbo-0125"
    trace = run_trace(settings_of(kr, trace_port))
    assert trace["verdict"]["state"] == "no fetch" and trace["verdict"]["fetchers"] == []
    assert trace["verdict"]["model"] == "gpt-3.5-turbo-0125" and trace["verdict"]["model_differs"] is True
    assert count(kr, "trace_fetches") == 0


def test_a_trace_through_a_group_that_fails_still_gives_a_verdict(
    kr: Keyrotor, relay: FakeUpstream, listening: Listening, trace_port: int
):
    relay.set_key(RELAY_KEY, "invalid")  # every key of the group refused: the proxy answers an error
    trace = run_trace(settings_of(kr, trace_port))
    assert trace["status"] and trace["status"] != 200 and trace["error"]
    assert trace["finished_at"] is not None and trace["verdict"]["state"] in ("fetched", "no fetch")


def known_trace(kr: Keyrotor, settings: Settings) -> str:
    conn = db.connect(settings.storage_path)
    try:
        return tracer.start(conn, settings, "relay/cheap", MODEL)[0]["trace_id"]
    finally:
        conn.close()


REFUSED_PATHS = [
    "/",
    "/api/flows",
    "/api/traces",
    "/api/traces/1",
    "/login",
    "/docs",
    "/api/openapi.json",
    "/metrics",
    "/dashboard",
    "/static/style.css",
    "/api/img",
    "/api/img?traceid=",
    "/api/img?traceid=unknown-but-well-formed-id-0000000000",
    "/api/img?traceid=../../etc/passwd",
    "/api/img?traceid=%27%20OR%201%3D1--",
    "/api/img?traceid=" + "a" * 200,
    "/api/img?trace_id={known}",
    "/api/img?traceid={known}&traceid={known}",
    "/api/img/?traceid={known}",
    "/API/IMG?traceid={known}",
    "/api/img/../flows?traceid={known}",
    "//api/img?traceid={known}",
]


def test_the_listener_refuses_every_path_but_trace_images_and_writes_nothing_for_them(
    kr: Keyrotor, listening: Listening, trace_port: int
):
    known = known_trace(kr, settings_of(kr, trace_port))
    before = {table: count(kr, table) for table in ("trace_fetches", "traces", "audit_log", "flows")}
    with httpx.Client(base_url=listening.url, trust_env=False, timeout=10) as client:
        for path in REFUSED_PATHS:
            response = client.get(path.format(known=known))
            assert response.status_code == 404, path
            assert "set-cookie" not in response.headers and response.headers["content-type"].startswith("text/plain")
        assert client.post(f"/api/img?traceid={known}").status_code == 405
        assert client.request("DELETE", f"/api/img?traceid={known}").status_code == 405
        assert {table: count(kr, table) for table in before} == before
        image = client.get(f"/api/img?traceid={known}")
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert image.content == core_traces.IMAGE and image.content.startswith(b"\x89PNG\r\n\x1a\n")
    assert count(kr, "trace_fetches") == 1


def test_the_listener_answers_garbage_with_400_and_a_slow_head_is_cut_off(listening: Listening, trace_port: int):
    with socket.create_connection(("127.0.0.1", trace_port), timeout=10) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 400")
    with socket.create_connection(("127.0.0.1", trace_port), timeout=10) as sock:
        sock.sendall(b"GET /api/img?traceid=x HTTP/1.1\r\nhost: a\r\nx-big: " + b"a" * 40_000 + b"\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 400")


def test_each_address_is_limited_and_a_trace_keeps_a_bounded_number_of_fetches(kr: Keyrotor, trace_port: int):
    settings = settings_of(kr, trace_port, trace__ip_rpm="30")
    known = known_trace(kr, settings)
    served = Listening(settings)
    try:
        with httpx.Client(base_url=served.url, trust_env=False, timeout=10) as client:
            statuses = [client.get(f"/api/img?traceid={known}").status_code for _ in range(30)]
            assert statuses == [200] * 30
            over = client.get(f"/api/img?traceid={known}")
            assert over.status_code == 429
            assert client.get("/api/img?traceid=unknown").status_code == 429  # unknown ids count too
        other = httpx.Client(
            base_url=served.url, transport=httpx.HTTPTransport(local_address="127.0.0.3"), trust_env=False
        )
        with other:
            assert other.get(f"/api/img?traceid={known}").status_code == 200  # another address: its own limit
    finally:
        served.close()
    assert count(kr, "trace_fetches") == core_traces.MAX_FETCHES_PER_TRACE
    addresses = {r["address"] for r in kr.query("SELECT address FROM trace_fetches")}
    assert addresses == {"127.0.0.1"}  # the fill was reached before 127.0.0.3 came: served, not kept


def test_a_parallel_burst_of_fetches_keeps_the_fill(kr: Keyrotor, listening: Listening, trace_port: int):
    known = known_trace(kr, settings_of(kr, trace_port))

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=listening.url, trust_env=False, timeout=30) as client:
            answers = await asyncio.gather(*(client.get(f"/api/img?traceid={known}") for _ in range(40)))
        return [a.status_code for a in answers]

    assert asyncio.run(burst()) == [200] * 40
    assert count(kr, "trace_fetches") == core_traces.MAX_FETCHES_PER_TRACE


def test_a_trace_runs_under_the_traces_client_and_its_budget(
    kr: Keyrotor, relay: FakeUpstream, listening: Listening, trace_port: int
):
    settings = settings_of(kr, trace_port)
    assert run_trace(settings)["status"] == 200
    kr.setup("clients", "set", tracer.TRACES_CLIENT, "--daily-tokens", "1")

    def refused() -> tuple[dict, bool] | None:
        seen = len(relay.received)
        trace = run_trace(settings)
        return (trace, len(relay.received) == seen) if trace["status"] == 429 else None

    trace, never_forwarded = wait_for(refused, timeout=20, what="the traces client's budget to apply")
    assert never_forwarded and trace["verdict"]["state"] == "no fetch"
    assert "budget" in (trace["error"] or "").lower() or "quota" in (trace["error"] or "").lower()


def test_the_schedule_runs_traces_of_each_entry(kr: Keyrotor, listening: Listening, trace_port: int):
    settings = settings_of(kr, trace_port, trace__schedule="relay/cheap gpt-4o-mini, nowhere/none gpt-4o")

    async def two_rounds() -> None:
        task = asyncio.create_task(tracer.run_schedule(settings, every_seconds=0.1, first_after=0))
        deadline = time.monotonic() + 30
        while count(kr, "traces") < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        task.cancel()

    asyncio.run(two_rounds())
    rows = kr.query("SELECT group_label, scheduled FROM traces")
    assert len(rows) >= 2 and {(r["group_label"], r["scheduled"]) for r in rows} == {("relay/cheap", 1)}
    actors = {r["actor"] for r in kr.query("SELECT actor FROM audit_log WHERE action = 'traces.run'")}
    assert actors == {"scheduler"}


def test_run_py_traces_run_prints_the_verdict_and_list_shows_it(kr: Keyrotor, relay: FakeUpstream, trace_port: int):
    flags = ("--proxy-port", str(kr.proxy_port), "--set", f"trace.port={trace_port}", "--set", "trace.grace_seconds=0")
    done = kr.cli("traces", "run", "relay/cheap", MODEL, *flags)
    assert "verdict: fetched by 1 distinct address" in done.stdout
    assert f"127.0.0.2  '{RELAY_AGENT}'" in done.stdout and f"system_fingerprint {SYSTEM_FINGERPRINT}" in done.stdout
    relay.fetch_images_as = None
    assert "verdict: no fetch" in kr.cli("traces", "run", "relay/cheap", MODEL, *flags).stdout
    listed = kr.cli("traces", "list").stdout.splitlines()
    assert [line.split("  ")[-1] for line in listed] == ["no fetch", "fetched by 1 distinct address"]
    assert kr.cli("traces", "list", "--model", "gpt-4o").stdout.strip() == "no traces"
    off = kr.cli("traces", "run", "relay/cheap", MODEL, check=False)  # trace.port is 0 by default
    assert off.returncode == 2 and "trace.port" in off.stderr
    missing = kr.cli("traces", "run", "relay/nope", MODEL, *flags, check=False)
    assert missing.returncode == 1 and "no group 'relay/nope'" in missing.stderr
    actions = [r["actor"] + " " + r["action"] for r in kr.query("SELECT * FROM audit_log WHERE action LIKE 'traces%'")]
    assert actions == ["cli traces.run", "cli traces.run"]


@pytest.fixture
def ui(kr: Keyrotor, trace_port: int) -> Keyrotor:
    kr.start_ui(
        "--proxy-port", str(kr.proxy_port), "--set", f"trace.port={trace_port}", "--set", "trace.grace_seconds=0"
    )
    wait_for(lambda: _port_open(trace_port), what="the UI's trace listener")
    return kr


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


TRACE_APIS = [
    ("GET", "/api/traces", None),
    ("GET", "/api/traces/1", None),
    ("GET", "/api/traces/model/gpt-4o-mini", None),
    ("POST", "/api/traces", {"group": "relay/cheap", "model": MODEL}),
    ("DELETE", "/api/traces/1", None),
    ("GET", "/traces", None),
    ("GET", "/traces/1", None),
]


def test_the_trace_api_is_the_admin_s_alone_and_runs_a_trace(ui: Keyrotor, relay: FakeUpstream, trace_port: int):
    relay.fetch_images_as = "<script>alert('ua')</script>"
    anonymous = httpx.Client(base_url=ui.ui_url, trust_env=False, timeout=20)
    guessing = httpx.Client(base_url=ui.ui_url, headers={"authorization": "Bearer kra-wrong"}, timeout=20)
    for method, path, body in TRACE_APIS:
        for client in (anonymous, guessing) if path.startswith("/api/") else (anonymous,):
            response = client.request(method, path, json=body)
            assert response.status_code in (401, 303, 429), (method, path, response.status_code)
    assert ui.query("SELECT count(*) AS n FROM traces")[0]["n"] == 0
    admin = httpx.Client(base_url=ui.ui_url, headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=20)
    assert admin.post("/api/traces", json={"group": "relay/nope", "model": MODEL}).status_code == 404
    assert admin.post("/api/traces", json={"group": "relay/cheap", "model": ""}).status_code == 422
    assert admin.post("/api/traces", json={"group": "no-slash", "model": MODEL}).status_code == 422
    started = admin.post("/api/traces", json={"group": "relay/cheap", "model": MODEL})
    assert started.status_code == 202, started.text
    trace_id = started.json()["id"]
    done = wait_for(
        lambda: (t := admin.get(f"/api/traces/{trace_id}").json())["finished_at"] and t,
        timeout=30,
        what="the verdict",
    )
    assert done["verdict"]["summary"] == "fetched by 1 distinct address", done
    assert done["verdict"]["fetchers"][0]["user_agents"] == ["<script>alert('ua')</script>"]
    assert [t["id"] for t in admin.get("/api/traces/model/gpt-4o-mini").json()["traces"]] == [trace_id]
    assert [t["id"] for t in admin.get("/api/traces", params={"group": "relay/cheap"}).json()["traces"]] == [trace_id]
    assert admin.get("/api/traces/model/gpt-4o").json()["traces"] == []
    assert admin.get("/api/traces", params={"group": "default/default"}).json()["traces"] == []
    browser = httpx.Client(base_url=ui.ui_url, timeout=20)
    assert browser.post("/login", data={"admin_key": ADMIN_KEY}).status_code == 303
    for page in ("/traces", f"/traces/{trace_id}"):
        text = browser.get(page).text
        assert "fetched by 1 distinct address" in text and "<script>alert" not in text
    assert "&lt;script&gt;alert(&#39;ua&#39;)&lt;/script&gt;" in browser.get(f"/traces/{trace_id}").text
    # A session cannot delete through the API without the page's CSRF token.
    assert browser.delete(f"/api/traces/{trace_id}").status_code == 403
    # The page's form runs a trace, and its page's button deletes it.
    page = browser.get("/traces").text
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    assert browser.post("/traces", data={"group": "relay/cheap", "model": MODEL}).status_code == 403  # no token
    ran = browser.post("/traces", data={"csrf": csrf, "group": "relay/cheap", "model": MODEL})
    assert ran.status_code == 303 and ran.headers["location"].startswith("/traces/")
    from_page = int(ran.headers["location"].rpartition("/")[2])
    wait_for(lambda: admin.get(f"/api/traces/{from_page}").json()["finished_at"], timeout=30, what="its verdict")
    deleted = browser.post(f"/traces/{from_page}/delete", data={"csrf": csrf})
    assert deleted.status_code == 303 and admin.get(f"/api/traces/{from_page}").status_code == 404
    assert admin.delete(f"/api/traces/{trace_id}").json() == {"deleted": trace_id}
    assert admin.get(f"/api/traces/{trace_id}").status_code == 404
    assert admin.delete(f"/api/traces/{trace_id}").status_code == 404
    assert ui.query("SELECT count(*) AS n FROM trace_fetches")[0]["n"] == 0
    actions = [r["action"] for r in ui.query("SELECT action FROM audit_log WHERE action LIKE 'traces.%' ORDER BY id")]
    assert actions == ["traces.run", "traces.run", "traces.delete", "traces.delete"]
    # The UI's listener serves only trace images; the UI's own paths stay on the UI's port.
    assert httpx.get(f"http://127.0.0.1:{trace_port}/api/traces", trust_env=False).status_code == 404
