"""run.py as a user runs it: subprocesses, real ports, signals."""

from __future__ import annotations

import os
import signal
import sqlite3
import stat
import subprocess
import sys

import httpx
import openai
import pytest

from tests.conftest import ADMIN_KEY, ROOT, START_DEADLINE, Keyrotor, free_port, port_open, raises, wait_for
from tests.fake_upstream import FakeUpstream

GOOD = "sk-good-cli-aaaaaaaaaaaaaaaaaaaaaaaaaa-0001"


@pytest.mark.parametrize("stop", ["sigterm-to-run.py", "ctrl-c-to-the-terminal-group"])
def test_serve_runs_both_and_stops_both(keyrotor: Keyrotor, upstream: FakeUpstream, stop: str):
    keyrotor.add_keys(GOOD)
    client_key = keyrotor.add_client()
    proxy_port, ui_port = free_port(), free_port()
    serve = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "run.py"),
            "serve",
            "--proxy-port",
            str(proxy_port),
            "--ui-port",
            str(ui_port),
            "--upstream",
            upstream.url,
        ],
        env=keyrotor.env,
        cwd=keyrotor.tmp,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, like a shell job
    )
    try:
        wait_for(lambda: port_open(proxy_port) and port_open(ui_port), START_DEADLINE, what="proxy and UI")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{proxy_port}/v1", api_key=client_key, max_retries=0)
        reply = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content
        assert httpx.get(f"http://127.0.0.1:{ui_port}/health").json() == {"status": "ok"}
        if stop == "sigterm-to-run.py":
            serve.send_signal(signal.SIGTERM)
        else:
            os.killpg(serve.pid, signal.SIGINT)  # what Ctrl-C does: every process of the job gets it
        output, _ = serve.communicate(timeout=30)
    finally:
        if serve.poll() is None:
            serve.kill()
    assert serve.returncode == 0, output
    assert not port_open(proxy_port) and not port_open(ui_port)
    # The row was flushed on the way out, not left in a queue.
    conn = sqlite3.connect(keyrotor.db_path)
    assert conn.execute("SELECT status, model FROM flows").fetchall() == [(200, "gpt-4o-mini")]
    conn.close()


def test_plain_mitmdump_with_the_script_works(keyrotor: Keyrotor, upstream: FakeUpstream):
    keyrotor.add_keys(GOOD)
    client_key = keyrotor.add_client()
    port = free_port()
    mitmdump = os.path.join(os.path.dirname(sys.executable), "mitmdump")
    process = subprocess.Popen(
        [
            mitmdump,
            "-s",
            str(ROOT / "addons" / "keyrotor.py"),
            "--mode",
            f"reverse:{upstream.url}",
            "--listen-host",
            "127.0.0.1",
            "--listen-port",
            str(port),
        ],
        env=keyrotor.env,
        cwd=keyrotor.tmp,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    keyrotor.processes.append(process)
    wait_for(lambda: port_open(port), START_DEADLINE, what="mitmdump")
    response = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"authorization": f"Bearer {client_key}"})
    assert response.status_code == 200
    assert upstream.keys_seen() == [GOOD]


def test_web_mode_serves_mitmweb_behind_the_admin_key(keyrotor: Keyrotor, upstream: FakeUpstream):
    keyrotor.add_keys(GOOD)
    client_key = keyrotor.add_client()
    web_port = free_port()
    keyrotor.start_proxy("--web", "--set", f"proxy.web_port={web_port}")
    wait_for(lambda: port_open(web_port), START_DEADLINE, what="mitmweb")
    assert httpx.get(f"http://127.0.0.1:{web_port}/flows").status_code == 403
    assert httpx.get(f"http://127.0.0.1:{web_port}/flows", params={"token": "wrong"}).status_code == 403
    response = httpx.get(f"{keyrotor.base_url}/models", headers={"authorization": f"Bearer {client_key}"})
    assert response.status_code == 200
    flows = httpx.get(f"http://127.0.0.1:{web_port}/flows", params={"token": ADMIN_KEY})
    assert flows.status_code == 200
    assert "/v1/models" in flows.text
    assert GOOD not in flows.text and client_key not in flows.text
    assert ADMIN_KEY not in keyrotor.logs()  # mitmweb's request lines carried it as ?token=


@pytest.mark.parametrize(
    "args, env, setting",
    [
        (["proxy"], {"KEYROTOR_PROXY_PORT": "70000"}, "proxy.port"),
        (["serve"], {"KEYROTOR_KEYPOOL_STRATEGY": "fastest"}, "keypool.strategy"),
        (["ui", "--set", "proxy.upstream=ftp://x"], {}, "proxy.upstream"),
        (["serve", "--config", "/nonexistent/keyrotor.toml"], {}, "/nonexistent/keyrotor.toml"),
        (["serve", "--set", "proxy.nonsense=1"], {}, "proxy.nonsense"),
    ],
)
def test_bad_settings_stop_start_up_with_one_sentence(keyrotor: Keyrotor, args, env, setting):
    keyrotor.env.update(env)
    result = keyrotor.cli(*args, check=False)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and setting in lines[0], result.stderr
    assert not keyrotor.db_path.exists()  # nothing was created on the way to the error


def test_keys_commands(keyrotor: Keyrotor):
    result = keyrotor.cli(
        "keys", "add", input=f"{GOOD}\n{GOOD}\nnot a key\n\nsk-good-cli-bbbbbbbbbbbbbbbbbbbbbbbbbbb-0002\n"
    )
    assert result.stdout.strip() == "added 2, skipped 1 duplicate(s), rejected 1 malformed (line 3)"
    listing = keyrotor.cli("keys", "list").stdout
    assert "…0001" in listing and "…0002" in listing and GOOD not in listing
    keyrotor.cli("keys", "disable", "1")
    assert "disabled" in keyrotor.cli("keys", "list").stdout.splitlines()[1]
    keyrotor.cli("keys", "enable", "1")
    keyrotor.cli("keys", "delete", "2")
    listing = keyrotor.cli("keys", "list").stdout
    assert "…0002" not in listing and "active" in listing
    assert keyrotor.cli("keys", "disable", "99", check=False).returncode == 1


def test_keys_are_named_on_adding_and_renamed(keyrotor: Keyrotor):
    third = "sk-good-cli-cccccccccccccccccccccccccccc-0003"
    added = keyrotor.cli("keys", "add", input=f"Key 1\t{GOOD}\n{third}\n").stdout
    assert added.strip() == "added 2, skipped 0 duplicate(s), rejected 0 malformed"
    keyrotor.cli("keys", "add", "--name", "spare", input="sk-good-cli-dddddddddddddddddddddddddddd-0004\n")
    assert keyrotor.cli("keys", "rename", "2", "Key 2").stdout.strip() == "key #2 is now named 'Key 2'"
    rows = {line.split()[0]: line for line in keyrotor.cli("keys", "list").stdout.splitlines()[1:]}
    assert "Key 1" in rows["1"] and "…0001" in rows["1"]
    assert "Key 2" in rows["2"] and "spare" in rows["3"]
    assert keyrotor.cli("keys", "rename", "2", "").stdout.strip() == "key #2 has no name"
    assert keyrotor.cli("keys", "rename", "99", "x", check=False).returncode == 1
    too_long = keyrotor.cli("keys", "rename", "1", "x" * 65, check=False)
    assert too_long.returncode == 2 and "at most 64" in too_long.stderr


def test_clients_commands(keyrotor: Keyrotor):
    key = keyrotor.add_client("alice")
    assert key.startswith("kr-") and len(key) > 40
    assert keyrotor.cli("clients", "add", "alice", check=False).returncode == 1
    keyrotor.cli("clients", "disable", "alice")
    listing = keyrotor.cli("clients", "list").stdout
    assert "alice" in listing and " no " in listing and key not in listing
    conn = sqlite3.connect(keyrotor.db_path)
    assert conn.execute("SELECT count(*) FROM client_keys WHERE key_hash = ?", (key,)).fetchone()[0] == 0
    conn.close()


def test_first_use_prints_a_generated_admin_key_once(keyrotor: Keyrotor):
    del keyrotor.env["KEYROTOR_ADMIN_KEY"]
    first = keyrotor.cli("keys", "list").stdout
    assert "Admin key" in first
    assert "Admin key" not in keyrotor.cli("keys", "list").stdout
    for suffix in ("secret", "admin"):
        mode = stat.S_IMODE(os.stat(f"{keyrotor.db_path}.{suffix}").st_mode)
        assert mode == 0o600, f".{suffix} is {oct(mode)}"
    admin_key = next(line.strip() for line in first.splitlines() if line.strip().startswith("kra-"))
    assert admin_key not in (keyrotor.db_path.parent / "keyrotor.db.admin").read_text()


def test_secret_from_the_environment_is_used_and_not_written(keyrotor: Keyrotor, upstream: FakeUpstream):
    from cryptography.fernet import Fernet

    keyrotor.env["KEYROTOR_SECRET"] = Fernet.generate_key().decode()
    keyrotor.add_keys(GOOD)
    client_key = keyrotor.add_client()
    assert not os.path.exists(f"{keyrotor.db_path}.secret")
    keyrotor.start_proxy()
    response = httpx.get(f"{keyrotor.base_url}/models", headers={"authorization": f"Bearer {client_key}"})
    assert response.status_code == 200 and upstream.keys_seen() == [GOOD]


@pytest.mark.parametrize("before", [True, False], ids=["before-subcommand", "after-subcommand"])
def test_flags_apply_wherever_they_stand(keyrotor: Keyrotor, tmp_path, before: bool):
    elsewhere = tmp_path / "elsewhere" / "kr.db"
    flag = ["--storage-path", str(elsewhere)]
    args = [*flag, "keys", "add"] if before else ["keys", "add", *flag]
    keyrotor.cli(*args, input=f"{GOOD}\n")
    assert elsewhere.exists() and not keyrotor.db_path.exists()


def test_keys_list_says_when_a_cooldown_is_over_instead_of_a_past_time(keyrotor: Keyrotor):
    keyrotor.add_keys(GOOD, "sk-good-cli-bbbbbbbbbbbbbbbbbbbbbbbbbbb-0002")
    conn = sqlite3.connect(keyrotor.db_path)
    with conn:
        conn.execute("UPDATE upstream_keys SET state = 'cooling', state_reason = '429', cooldown_until = 1000")
        conn.execute("UPDATE upstream_keys SET cooldown_until = 4102444800 WHERE id = 2")  # 2100-01-01
    conn.close()
    rows = keyrotor.cli("keys", "list").stdout.splitlines()[1:]
    assert rows[0].endswith("429 cooldown over: the next request tries it"), rows[0]
    assert rows[1].endswith("429 until 2100-01-01 00:00:00Z"), rows[1]


def test_commands_from_another_directory_act_on_the_running_proxys_database(
    keyrotor: Keyrotor, upstream: FakeUpstream, tmp_path
):
    # The same config file and environment, no storage.path anywhere: the default database.
    config = tmp_path / "conf" / "keyrotor.toml"
    config.parent.mkdir()
    config.write_text('[capture]\nbodies = "none"\n')
    env = {k: v for k, v in keyrotor.env.items() if k != "KEYROTOR_STORAGE_PATH"}
    env["KEYROTOR_CONFIG"] = str(config)
    server_dir, shell_dir = tmp_path / "service", tmp_path / "home"
    server_dir.mkdir()
    shell_dir.mkdir()
    port = free_port()
    proxy = subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), "proxy", "--proxy-port", str(port), "--upstream", upstream.url],
        env=env,
        cwd=server_dir,  # where a service manager starts it
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    keyrotor.processes.append(proxy)
    wait_for(lambda: port_open(port), START_DEADLINE, what="proxy")

    def cli(*args: str, stdin: str | None = None) -> str:
        done = subprocess.run(
            [sys.executable, str(ROOT / "run.py"), *args],
            env=env,
            cwd=shell_dir,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    cli("keys", "add", stdin=GOOD + "\n")
    client_key = cli("clients", "add", "from-home").strip().splitlines()[-1]
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=client_key, max_retries=0)
    wait_for(lambda: not isinstance(raises(client.models.list), openai.AuthenticationError), what="the new client")
    assert upstream.keys_seen()[-1] == GOOD
    assert (config.parent / "data" / "keyrotor.db").exists()


def test_a_short_admin_key_from_the_environment_is_refused(keyrotor: Keyrotor):
    keyrotor.env["KEYROTOR_ADMIN_KEY"] = "letmein-123"
    for command in (["keys", "list"], ["ui"], ["proxy"]):
        result = keyrotor.cli(*command, check=False)
        assert result.returncode == 2, command
        assert "KEYROTOR_ADMIN_KEY must be at least 24 characters" in result.stderr
        assert "letmein-123" not in result.stderr + result.stdout


def test_admin_rotate_replaces_the_key_and_ends_every_session(keyrotor: Keyrotor, upstream: FakeUpstream):
    del keyrotor.env["KEYROTOR_ADMIN_KEY"]
    first = keyrotor.cli("keys", "add", input=f"{GOOD}\n").stdout
    old_key = next(line.strip() for line in first.splitlines() if line.strip().startswith("kra-"))
    web_port = free_port()
    keyrotor.start_ui()
    keyrotor.start_proxy("--web", "--set", f"proxy.web_port={web_port}")
    wait_for(lambda: port_open(web_port), START_DEADLINE, what="mitmweb")
    mitmweb = f"http://127.0.0.1:{web_port}"
    ui = httpx.Client(base_url=keyrotor.ui_url, follow_redirects=False)
    assert ui.post("/login", data={"admin_key": old_key}).status_code == 303
    assert ui.get("/api/flows").status_code == 200
    web = httpx.Client(base_url=mitmweb)
    assert web.get("/flows", params={"token": old_key}).status_code == 200
    assert web.get("/flows").status_code == 200  # logged in by its cookie now

    rotated = keyrotor.cli("admin", "rotate").stdout
    new_key = rotated.strip().splitlines()[-1]
    assert new_key.startswith("kra-") and new_key != old_key and rotated.count(new_key) == 1
    assert "1 UI session(s) ended" in rotated

    assert ui.get("/api/flows").status_code == 401  # the session cookie
    assert httpx.get(f"{keyrotor.ui_url}/api/flows", headers={"authorization": f"Bearer {old_key}"}).status_code == 401
    assert httpx.get(f"{keyrotor.ui_url}/api/flows", headers={"authorization": f"Bearer {new_key}"}).status_code == 200
    wait_for(lambda: web.get("/flows").status_code == 403, what="mitmweb to forget its login")
    assert httpx.get(f"{mitmweb}/flows", params={"token": old_key}).status_code == 403
    assert httpx.get(f"{mitmweb}/flows", params={"token": new_key}).status_code == 200
    assert new_key not in keyrotor.logs() and old_key not in keyrotor.logs()
    ui.close()
    web.close()


def test_admin_rotate_refuses_a_key_from_the_environment(keyrotor: Keyrotor):
    result = keyrotor.cli("admin", "rotate", check=False)
    assert result.returncode == 1
    assert "KEYROTOR_ADMIN_KEY" in result.stderr
