"""keyrotor on PostgreSQL (storage.url): real proxies and the UI in front of one real PostgreSQL.

The URL reaches the processes through KEYROTOR_STORAGE_URL only: never their arguments.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from storage import db, pg
from tests.conftest import ADMIN_KEY, Keyrotor, free_port, port_open, wait_for
from tests.services import PostgresServer

AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
SECRET = "5R6Sx3h3cxmmCPk1nYkNqQmBY5iXyH_ZpThk1n7NWvI="  # every node shares the installation's secret


@pytest.fixture(autouse=True)
def _sqlite_again_after() -> Iterator[None]:
    """keyrotor.setup runs the CLI in this process: its storage.url must not outlive the test."""
    yield
    db.use_postgres(None)


@pytest.fixture
def on_postgres(keyrotor: Keyrotor, postgres_url: str) -> Keyrotor:
    keyrotor.env.update(KEYROTOR_STORAGE_URL=postgres_url, KEYROTOR_SECRET=SECRET)
    return keyrotor


def second_node(first: Keyrotor, tmp_path: Path) -> Keyrotor:
    """Another installation directory (another machine's), on the same database and secret."""
    other = tmp_path / "node-b"
    other.mkdir()
    env = dict(first.env, KEYROTOR_STORAGE_PATH=str(other / "keyrotor.db"))
    return Keyrotor(tmp=other, upstream_url=first.upstream_url, env=env)


def chat(base_url: str, client_key: str, text: str) -> str:
    client = openai.OpenAI(base_url=base_url, api_key=client_key, max_retries=0, timeout=30)
    answer = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": text}])
    return answer.id


def listed(ui_url: str, **params: str) -> list[dict]:
    response = httpx.get(f"{ui_url}/api/flows", params=params, headers=AUTH, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()["flows"]


def own_arguments_and_logs(node: Keyrotor) -> str:
    texts = [node.logs(), (node.tmp / "ui.log").read_text() if (node.tmp / "ui.log").exists() else ""]
    for process in node.processes:
        texts.append(Path(f"/proc/{process.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())
    return "\n".join(texts)


def test_flows_from_two_proxies_on_one_postgresql_are_recorded_and_found_in_one_ui(
    on_postgres: Keyrotor, postgres_url: str, tmp_path: Path
):
    node_a = on_postgres
    client_key = node_a.start_serving("sk-good-postgres-aaaaaaaaaaaaaaaaaaaa0001")
    port_a = node_a.proxy_port
    node_b = second_node(node_a, tmp_path)
    try:
        node_b.start_proxy()  # keys and clients are the database's: node B serves the same client
        chat(f"http://127.0.0.1:{port_a}/v1", client_key, "aardvark from node a")
        chat(node_b.base_url, client_key, "bumblebee from node b")
        node_a.start_ui()
        found_a = wait_for(lambda: listed(node_a.ui_url, q="aardvark"), what="node A's flow in the UI")
        found_b = wait_for(lambda: listed(node_a.ui_url, q="bumblebee"), what="node B's flow in node A's UI")
        assert [f["path"] for f in found_a + found_b] == ["/v1/chat/completions"] * 2
        assert listed(node_a.ui_url, q="aardvark bumblebee") == []  # every word must be in the flow
        assert not (node_a.db_path.exists() or node_b.db_path.exists())  # no SQLite file anywhere
        conn = pg.connect(postgres_url)
        assert conn.execute("SELECT count(*) FROM flows").fetchone()[0] == 2
        conn.close()
        password_url = postgres_url.split("@")[0]  # postgresql://keyrotor:keyrotor
        for node in (node_a, node_b):
            assert password_url not in own_arguments_and_logs(node)
    finally:
        node_b.stop()


def test_postgresql_stopped_for_ten_seconds_loses_no_capture_and_fails_no_request(
    on_postgres: Keyrotor, postgres_url: str, postgres_server: PostgresServer
):
    client_key = on_postgres.start_serving("sk-good-postgres-aaaaaaaaaaaaaaaaaaaa0001")
    failures: list[BaseException] = []
    sent = [0]
    stop = threading.Event()

    def load() -> None:
        client = openai.OpenAI(base_url=on_postgres.base_url, api_key=client_key, max_retries=0, timeout=30)
        while not stop.is_set():
            try:
                client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
                sent[0] += 1
            except Exception as e:  # noqa: BLE001 (every failure counts)
                failures.append(e)
            time.sleep(0.02)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: sent[0] >= 20, what="traffic before the outage")
        postgres_server.stop()
        try:
            before = sent[0]
            time.sleep(10)
            during = sent[0] - before
        finally:
            postgres_server.start()
        wait_for(lambda: sent[0] >= before + during + 20, what="traffic after the outage")
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert failures == []
    assert during > 50  # clients were served while PostgreSQL was away
    conn = pg.connect(postgres_url)
    try:
        wait_for(
            lambda: conn.execute("SELECT count(*) FROM flows").fetchone()[0] == sent[0],
            timeout=30,
            what=f"all {sent[0]} flows stored",
        )
    finally:
        conn.close()
    assert "captured flows are lost" not in on_postgres.logs()
    assert os.path.exists(on_postgres.tmp)


def test_storage_copy_moves_an_installation_whose_keys_and_clients_then_serve_from_postgresql(
    keyrotor: Keyrotor, postgres_url: str
):
    client_key = keyrotor.start_serving("sk-good-postgres-aaaaaaaaaaaaaaaaaaaa0001")
    chat(keyrotor.base_url, client_key, "capybara before the move")
    keyrotor.stop()  # the proxy stops before the copy
    without_password = postgres_url.replace("keyrotor:keyrotor@", "keyrotor@")
    keyrotor.env["PGPASSWORD"] = "keyrotor"  # libpq's own: the password stays out of the arguments
    copied = keyrotor.cli("storage", "copy", "--to", without_password)
    assert "flows: 1 copied, 1 in SQLite" in copied.stdout and "upstream_keys: 1 copied" in copied.stdout
    assert copied.stdout.rstrip().splitlines()[-1].startswith("done: ")
    again = keyrotor.cli("storage", "copy", "--to", without_password)  # nothing left: nothing twice
    assert "flows:" not in again.stdout and again.stdout.rstrip().splitlines()[-1].startswith("done: 0 rows")
    with_password = keyrotor.cli("storage", "copy", "--to", postgres_url)
    assert "keyrotor:keyrotor@" not in with_password.stdout + with_password.stderr
    assert "process list" in with_password.stderr  # told where the password shows

    secret = (keyrotor.db_path.parent / (keyrotor.db_path.name + ".secret")).read_text().strip()
    keyrotor.env.update(KEYROTOR_STORAGE_URL=postgres_url, KEYROTOR_SECRET=secret)
    keyrotor.start_proxy()
    chat(keyrotor.base_url, client_key, "capybara after the move")  # the copied key decrypts, the client is known
    keyrotor.start_ui()
    found = wait_for(lambda: len(listed(keyrotor.ui_url, q="capybara")) == 2, what="both flows in the UI")
    assert found


def test_workers_on_postgresql_without_redis_are_refused_with_what_to_set(on_postgres: Keyrotor):
    on_postgres.add_keys("sk-good-postgres-aaaaaaaaaaaaaaaaaaaa0001")
    port = str(free_port())
    result = on_postgres.cli("proxy", "--proxy-port", port, "--workers", "2", check=False)
    assert result.returncode != 0
    assert "needs redis.url" in result.stdout + result.stderr
    assert not port_open(int(port))
