"""Large bodies are let go once their flows end: no per-flow state keeps them, and memory goes back to the system.

The figures (RSS idle, peak, after bursts of 8 x 99 MiB uploads) come from bench/upload_memory.py;
these tests check the mechanisms, never the RSS or its timing.
"""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest
from mitmproxy.test import tflow, tutils

from addons import memory, upstream_watch
from addons.memory import LARGE_BODY_BYTES, Memory
from addons.upstream_watch import UpstreamWatch


def large_flow() -> tflow.HTTPFlow:
    return tflow.tflow(req=tutils.treq(method=b"POST", content=b"x" * LARGE_BODY_BYTES), resp=True)


def test_flows_with_a_large_body_bring_one_relief_and_small_ones_none(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(memory, "RELIEF_DELAY_SECONDS", 0.01)
    addon = Memory()

    async def run() -> tuple[int, int]:
        addon.response(tflow.tflow(resp=True))
        addon.error(tflow.tflow(err=True))
        await asyncio.sleep(0.05)
        small = addon.reliefs
        for flow in (large_flow(), large_flow(), large_flow()):  # a burst: one relief, not one per flow
            addon.response(flow)
        await asyncio.sleep(0.05)
        return small, addon.reliefs

    assert asyncio.run(run()) == (0, 1)


def test_a_relief_frees_a_finished_flow_kept_only_by_a_reference_cycle():
    flow = large_flow()
    flow.metadata["self"] = flow  # the kind of cycle mitmproxy's flows and layers sit in
    gone = weakref.ref(flow)
    gc.disable()  # no collection by chance meanwhile
    try:
        del flow
        assert gone() is not None
        Memory().relieve()
        assert gone() is None
    finally:
        gc.enable()


def test_the_timeout_sweep_keeps_no_finished_flow_alive(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(upstream_watch, "SWEEP_SECONDS", 0.005)
    watch = UpstreamWatch()

    async def run() -> bool:
        flow = large_flow()
        flow.response = None
        watch.request(flow)  # an exchange the sweep looks at
        sweep = asyncio.create_task(watch._sweep())
        await asyncio.sleep(0.03)
        upstream_watch._watched.pop(flow.id)  # its answer came: the exchange ended
        gone = weakref.ref(flow)
        del flow
        await asyncio.sleep(0.03)
        gc.collect()
        sweep.cancel()
        return gone() is None

    assert asyncio.run(run()), "the sweep's frame still holds the last flow it looked at (and its bodies)"


def test_capture_keeps_no_per_flow_state_after_a_flow_ends():
    from mitmproxy.test import taddons

    from addons.capture import Capture
    from config import ROOT
    from tests.fakes import MemoryWriter

    records = MemoryWriter()
    addon = Capture(records=records)
    with taddons.context(addon) as tctx:
        tctx.configure(addon, capture_prices=str(ROOT / "prices.toml"))
        addon.running()
        sse = tflow.tflow(resp=tutils.tresp(headers=((b"content-type", b"text/event-stream"),)))
        failed = tflow.tflow(err=True)
        for flow in (sse, failed):
            addon.requestheaders(flow)
        addon.responseheaders(sse)
        addon.response(sse)
        addon.error(failed)
        assert addon._unfinished == {} and addon._tees == {}
