"""What run.py prints, counted: by default a line per start, stop, state change and error, none per
request; --verbose brings the per-request lines (mitmdump's per-flow lines, connections, the UI's
access log) back."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import Keyrotor, wait_for

GOOD = "sk-good-aaaaaaaaaaaaaaaaaaaaaaaaaaaa0001"
BAD = "sk-bad-bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb0002"  # the fake upstream answers 401 invalid_api_key
MESSAGES = [{"role": "user", "content": "hi"}]
REQUESTS = 6
PER_REQUEST_MARKS = ("/v1/", "client connect", "server connect", "HTTP Request", "<< 200")


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def traffic(kr: Keyrotor, client_key: str) -> None:
    client = openai.OpenAI(base_url=kr.base_url, api_key=client_key, max_retries=0, timeout=20)
    for _ in range(REQUESTS // 2):
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        for _ in client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True):
            pass
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=kr.base_url, api_key="kr-not-a-key", max_retries=0).models.list()


@pytest.mark.parametrize("verbose", [False, True])
def test_the_proxy_console_has_no_line_per_request_unless_verbose(keyrotor: Keyrotor, verbose: bool):
    client_key = keyrotor.start_serving(GOOD, BAD, proxy_args=("--verbose",) if verbose else ())
    traffic(keyrotor, client_key)
    keyrotor.stop()
    output = lines(keyrotor.logs())
    per_request = [line for line in output if any(mark in line for mark in PER_REQUEST_MARKS)]
    state = [line for line in output if "upstream key #2 …0002 is now invalid" in line]
    assert len(state) == 1  # a state change: said once, in both modes
    assert "Traceback" not in keyrotor.logs()  # stopping with connections open is no error
    assert not any(secret in keyrotor.logs() for secret in (GOOD, BAD, client_key, GOOD[-8:], BAD[-8:]))
    if verbose:
        assert sum("/v1/chat/completions" in line for line in per_request) >= REQUESTS
        assert any("client connect" in line for line in per_request)
    else:
        assert per_request == []
        assert [line.split("] ", 1)[-1].split(" ")[0:2] for line in output] == [
            ["routes", "loaded:"],
            ["client", "keys"],
            ["reverse", "proxy"],  # … listening at: the start
            ["upstream", "key"],  # … is now invalid
            ["reverse", "proxy"],  # … stopped
        ], output


def test_a_group_left_without_a_usable_key_is_said_once_and_so_is_its_return(keyrotor: Keyrotor):
    client_key = keyrotor.start_serving(BAD)
    client = openai.OpenAI(base_url=keyrotor.base_url, api_key=client_key, max_retries=0, timeout=20)
    for _ in range(4):
        with pytest.raises(openai.APIStatusError):
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    said = "group default/default has no usable upstream key (1 invalid)"
    wait_for(lambda: said in keyrotor.logs(), 10, what="the group's line")
    keyrotor.add_keys(GOOD)
    wait_for(lambda: "group default/default has a usable upstream key again" in keyrotor.logs(), 10, what="its return")
    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    keyrotor.stop()
    assert keyrotor.logs().count(said) == 1
    assert keyrotor.logs().count("has a usable upstream key again") == 1


@pytest.mark.parametrize("verbose", [False, True])
def test_the_ui_console_says_start_and_stop_and_requests_only_when_verbose(keyrotor: Keyrotor, verbose: bool):
    keyrotor.start_ui(*(["--verbose"] if verbose else []))
    for _ in range(5):
        assert httpx.get(f"{keyrotor.ui_url}/health").status_code == 200
    keyrotor.stop()
    output = lines((keyrotor.tmp / "ui.log").read_text())
    access = [line for line in output if "GET /health" in line]
    if verbose:
        assert len(access) == 5
    else:
        assert output == [f"INFO:     keyrotor UI listening at {keyrotor.ui_url}/", "INFO:     keyrotor UI stopped"]
