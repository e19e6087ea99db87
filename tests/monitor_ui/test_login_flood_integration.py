"""Guessing the admin key in parallel, against a real UI server behind a trusted reverse proxy
(X-Forwarded-For names each address): one address's flood holds no worker another needs, and is
checked one held answer at a time, so parallel guesses are not faster than sequential ones."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx

from core.login_throttle import LOCK_AFTER
from tests.conftest import ADMIN_KEY, Keyrotor, wait_for

GUESSER, ADMIN_ADDRESS = "198.51.100.66", "203.0.113.5"
FLOOD = 30


def login(ui: httpx.Client, address: str, key: str) -> httpx.Response:
    return ui.post("/login", data={"admin_key": key}, headers={"x-forwarded-for": address})


def api_call(ui: httpx.Client, address: str, key: str) -> httpx.Response:
    return ui.get("/api/clients", headers={"x-forwarded-for": address, "authorization": f"Bearer {key}"})


def test_a_flood_of_wrong_keys_does_not_hold_back_the_admin_elsewhere(keyrotor: Keyrotor):
    keyrotor.start_ui("--set", "ui.trusted_proxies=127.0.0.1")
    ui = httpx.Client(base_url=keyrotor.ui_url, follow_redirects=False, timeout=30)
    assert [login(ui, GUESSER, f"kra-guess-{i}").status_code for i in range(LOCK_AFTER)] == [401] * LOCK_AFTER

    with ThreadPoolExecutor(FLOOD) as pool:
        flood = [pool.submit(api_call, ui, GUESSER, f"kra-parallel-{i}") for i in range(FLOOD)]
        # All but one are answered at once, unchecked: that one's wrong key is held back.
        wait_for(lambda: sum(f.done() for f in flood) == FLOOD - 1, 20, what="the unchecked answers")
        held = next(f for f in flood if not f.done())
        assert api_call(ui, GUESSER, ADMIN_KEY).status_code == 429  # even the right key waits its turn here
        assert login(ui, GUESSER, ADMIN_KEY).status_code == 429  # (the form: the login page with the wait)
        assert api_call(ui, ADMIN_ADDRESS, ADMIN_KEY).status_code == 200
        admin = login(ui, ADMIN_ADDRESS, ADMIN_KEY)
        assert admin.status_code == 303 and "keyrotor_session" in admin.headers["set-cookie"]
        assert not held.done()  # the admin elsewhere was let in while the guesser's answer is still held
        answers = [f.result() for f in flood]
    assert {a.status_code for a in answers} == {429}
    assert all(a.headers["content-type"].startswith("application/json") for a in answers)
    messages = [a.json()["error"]["message"] for a in answers]
    assert sum("still being answered" in m for m in messages) == FLOOD - 1  # never checked
    assert all(int(a.headers["retry-after"]) >= 1 for a in answers)
    # The hold over, the right key is accepted at the guessing address too, and clears its count.
    assert login(ui, GUESSER, ADMIN_KEY).status_code == 303
    assert login(ui, GUESSER, "kra-wrong-once-more").status_code == 401
