"""The Chain run.py's proxy registers in place of keyrotor's concerns: mitmproxy's dispatch, kept."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine

import pytest
from mitmproxy import exceptions, hooks
from mitmproxy.test import taddons, tflow

from addons import keyrotor
from addons.chain import Chain, hook_names


class Recorder:
    def __init__(self, name: str, calls: list[str]) -> None:
        self.name, self.calls = name, calls

    def request(self, flow: object) -> None:
        self.calls.append(f"{self.name}.request")


class Waiting(Recorder):
    """A concern whose hook must wait, as the key pool's does: it returns a coroutine."""

    def request(self, flow: object) -> Coroutine | None:
        async def wait() -> None:
            await asyncio.sleep(0)
            self.calls.append(f"{self.name}.request (after its wait)")

        return wait()


class Failing(Recorder):
    def request(self, flow: object) -> None:
        raise RuntimeError("boom")


class Refusing:
    def configure(self, updated: set[str]) -> None:
        raise exceptions.OptionsError("a setting no user would want")


def test_hooks_run_in_the_concerns_order_and_only_hooks_someone_implements_exist():
    calls: list[str] = []
    chain = Chain([Recorder("a", calls), Recorder("b", calls)])
    assert chain.request(tflow.tflow()) is None  # no coroutine when nobody waits
    assert calls == ["a.request", "b.request"]
    assert getattr(chain, "response", None) is None  # mitmproxy's lookup finds nothing to call
    assert getattr(chain, "update", None) is None


def test_a_concern_that_waits_is_awaited_before_the_next_one_runs():
    calls: list[str] = []
    chain = Chain([Recorder("a", calls), Waiting("w", calls), Recorder("b", calls)])
    pending = chain.request(tflow.tflow())
    assert calls == ["a.request"]  # b waits for w
    assert pending is not None
    asyncio.run(pending)  # what mitmproxy does with an awaitable a hook returns
    assert calls == ["a.request", "w.request (after its wait)", "b.request"]


def test_an_error_in_one_concern_is_logged_and_the_next_still_runs(caplog: pytest.LogCaptureFixture):
    calls: list[str] = []
    chain = Chain([Failing("f", calls), Recorder("b", calls)])
    with caplog.at_level(logging.ERROR):
        chain.request(tflow.tflow())
    assert calls == ["b.request"]
    assert "Addon error: boom" in caplog.text


def test_a_refused_setting_still_refuses():
    with taddons.context() as tctx:
        tctx.master.addons.add(Chain([Refusing()]))
        with pytest.raises(exceptions.OptionsError):
            tctx.master.addons.trigger(hooks.ConfigureHook({"x"}))


def test_every_hook_of_every_concern_is_dispatched():
    chain = Chain(keyrotor.addons)
    implemented = {
        name for concern in keyrotor.addons for name in hook_names() if callable(getattr(concern, name, None))
    }
    assert {
        "load",
        "configure",
        "running",
        "done",
        "request",
        "responseheaders",
        "error",
        "keyrotor_answered",
    } <= implemented
    for name in hook_names():
        assert callable(getattr(chain, name, None)) == (name in implemented), name
