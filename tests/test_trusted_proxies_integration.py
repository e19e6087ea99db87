"""access.trusted_proxies end to end: the proxy believes X-Forwarded-For only from the reverse proxies it lists.

Invariants, seen from outside with the official openai client (and httpx bound to other loopback
addresses, so that the peer itself differs): a listed proxy's X-Forwarded-For names the client for
its address allowlist, the per-address limit and the flow's row; what a client writes into the
header itself never counts (only the hop the trusted proxy appended does); from any other peer the
header is ignored; the header a trusted proxy sent never reaches upstream.
"""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import Keyrotor, wait_for
from tests.fake_upstream import FakeUpstream

GOOD = ["sk-good-aaaaaaaaaaaaaaaaaaaaaaaaaaaa0001"]
MESSAGES = [{"role": "user", "content": "Where am I calling from?"}]
OFFICE = "203.0.113.7"  # the client's address, as a reverse proxy on 127.0.0.1 would forward it
ELSEWHERE = "198.51.100.9"


def chat(kr: Keyrotor, key: str, forwarded_for: str | None = None, source: str = "127.0.0.1"):
    """A chat request from `source` (a loopback address the connection is bound to), with that header."""
    headers = {"x-forwarded-for": forwarded_for} if forwarded_for is not None else {}
    http_client = httpx.Client(transport=httpx.HTTPTransport(local_address=source), timeout=20)
    client = openai.OpenAI(base_url=kr.base_url, api_key=key, max_retries=0, http_client=http_client)
    with http_client:
        return client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, extra_headers=headers)


def addresses(kr: Keyrotor, count: int) -> list[str | None]:
    rows = wait_for(lambda: len(r := kr.query("SELECT * FROM flows ORDER BY id")) >= count and r, what="rows")
    return [row["client_addr"] for row in rows]


def new_client(kr: Keyrotor, name: str, *limits: str) -> str:
    return kr.setup("clients", "add", name, *limits).stdout.strip().splitlines()[-1]


@pytest.fixture
def kr(keyrotor: Keyrotor) -> Keyrotor:
    keyrotor.add_keys(*GOOD)
    return keyrotor


def test_a_trusted_proxys_forwarded_address_is_the_clients(kr: Keyrotor, upstream: FakeUpstream):
    office_only = new_client(kr, "office", "--ips", f"{OFFICE}/32")
    kr.start_proxy("--set", "access.trusted_proxies=127.0.0.1")
    assert chat(kr, office_only, OFFICE).choices  # nginx on 127.0.0.1 forwarding the office
    # A client that writes the office's address itself: the proxy in front appends the real one, which counts.
    with pytest.raises(openai.PermissionDeniedError) as raised:
        chat(kr, office_only, f"{OFFICE}, {ELSEWHERE}")
    assert raised.value.code == "ip_not_allowed" and ELSEWHERE in raised.value.message
    # Chains of trusted proxies are skipped from the right; the first address that is no proxy is the client.
    assert chat(kr, office_only, f"{ELSEWHERE}, {OFFICE}, 127.0.0.1").choices
    assert addresses(kr, 3) == [OFFICE, ELSEWHERE, OFFICE]
    assert [r.headers.get("x-forwarded-for") for r in upstream.received] == [None, None]  # never sent upstream


def test_forwarded_for_from_a_peer_that_is_not_listed_is_ignored(kr: Keyrotor, upstream: FakeUpstream):
    office_only = new_client(kr, "office", "--ips", f"{OFFICE}/32")
    anyone = new_client(kr, "anyone")
    kr.start_proxy("--set", "access.trusted_proxies=127.0.0.1")
    with pytest.raises(openai.PermissionDeniedError) as raised:
        chat(kr, office_only, OFFICE, source="127.0.0.2")  # a client claiming to be the office
    assert raised.value.code == "ip_not_allowed" and "127.0.0.2" in raised.value.message
    assert chat(kr, anyone, OFFICE, source="127.0.0.2").choices
    assert addresses(kr, 2) == ["127.0.0.2", "127.0.0.2"]
    # Not from a trusted proxy: the header is the client's own, and goes on as it sent it.
    assert [r.headers.get("x-forwarded-for") for r in upstream.received] == [OFFICE]


def test_without_trusted_proxies_the_header_counts_for_nothing(kr: Keyrotor, upstream: FakeUpstream):
    office_only = new_client(kr, "office", "--ips", f"{OFFICE}/32")
    kr.start_proxy()
    with pytest.raises(openai.PermissionDeniedError) as raised:
        chat(kr, office_only, OFFICE)
    assert "127.0.0.1" in raised.value.message
    assert addresses(kr, 1) == ["127.0.0.1"]


def test_the_per_address_limit_counts_each_forwarded_client(kr: Keyrotor, upstream: FakeUpstream):
    key = new_client(kr, "shared")
    kr.start_proxy("--set", "access.trusted_proxies=127.0.0.0/30", "--set", "access.ip_rpm=1")
    assert chat(kr, key, OFFICE).choices
    assert chat(kr, key, ELSEWHERE, source="127.0.0.2").choices  # through a second trusted proxy
    with pytest.raises(openai.RateLimitError) as raised:
        chat(kr, key, f"{ELSEWHERE}, {OFFICE}", source="127.0.0.2")  # the office again, via both proxies
    assert raised.value.code == "rate_limit_exceeded"
    assert addresses(kr, 3) == [OFFICE, ELSEWHERE, OFFICE]
