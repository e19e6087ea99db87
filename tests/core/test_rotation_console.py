"""A group left without a usable key is said once on the console, and so is its return."""

from __future__ import annotations

import logging

import pytest

from core.models import KeyState, PoolKey
from core.rotation import Rotation


def key(key_id: int, state: KeyState) -> PoolKey:
    return PoolKey(key_id, f"sk-{key_id:040d}", f"{key_id:04d}", state, None, None, 1.0, 0)


def said(caplog: pytest.LogCaptureFixture) -> list[str]:
    lines = [r.getMessage() for r in caplog.records if r.name == "core.rotation"]
    caplog.clear()
    return lines


def test_the_group_line_comes_once_per_change_and_never_for_a_disabled_group(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="core.rotation")
    rotation = Rotation()
    rotation.label = "openai/main"
    rotation.pool.replace_keys([key(1, KeyState.ACTIVE), key(2, KeyState.COOLING)])
    rotation.announce_usable()
    assert said(caplog) == []  # usable at start: nothing to say
    rotation.pool.replace_keys([key(1, KeyState.INVALID), key(2, KeyState.EXHAUSTED), key(3, KeyState.DISABLED)])
    rotation.announce_usable()
    rotation.announce_usable()
    assert said(caplog) == [
        "group openai/main has no usable upstream key (1 exhausted, 1 invalid, 1 disabled): its models are served"
        " by other groups, or refused, until re-validation or an admin brings one back"
    ]
    rotation.pool.replace_keys([key(1, KeyState.COOLING)])
    rotation.announce_usable()
    assert said(caplog) == ["group openai/main has a usable upstream key again"]
    rotation.pool.replace_keys([])
    rotation.announce_usable(serving=False)  # disabled: no line, and none when it comes back usable
    assert said(caplog) == []
    rotation.announce_usable()
    assert said(caplog) == ["group openai/main has no upstream key: its models are served by other groups, or refused"]
