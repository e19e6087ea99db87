"""One addon in front of keyrotor's concerns, for the proxy `run.py` starts.

mitmproxy's AddonManager dispatches every event to every addon in its chain (and a second
event, `update`, after each flow event), each through a context manager and a walk of the
addon's children, whether or not the addon implements the hook. With twenty concerns that
walk was a large share of the proxy's own work per request. Chain is registered as one
addon instead: for each hook some concern implements it holds those concerns' methods, in
the concerns' order, and calls them directly; hooks no concern implements are not attributes
at all, so mitmproxy's lookup finds nothing to call. Each concern stays its own class.

What mitmproxy's dispatch guarantees is kept: the concerns run in order; an exception in one
is logged ("Addon error: …", as mitmproxy logs it) and the next concern still runs, while
OptionsError (a refused setting) and AddonHalt propagate as they do in mitmproxy; a hook that
returns an awaitable (the key pool's, when it must wait) is awaited before the next concern
runs. The dispatch itself is a plain function that returns a coroutine only from the first
concern that returned one, so the common case costs no coroutine at all.
The -s entry (`mitmdump -s addons/keyrotor.py`) loads the concerns one by one as before.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Sequence

from mitmproxy import exceptions, hooks

log = logging.getLogger(__name__)


def hook_names() -> frozenset[str]:
    """Every event an addon can implement: mitmproxy's hook registry plus `load`, which is not in it.
    Read when a Chain is made, not at import: keyrotor's own hooks (addons/retry_stream.py's
    `keyrotor_answered`) join the registry when their module is imported, whatever the order."""
    return frozenset({*hooks.all_hooks, "load"})


class Chain:
    """Dispatches each hook to every concern implementing it, in order, in one call from mitmproxy."""

    name = "keyrotor_chain"

    def __init__(self, concerns: Sequence[object]) -> None:
        self.concerns = tuple(concerns)
        for name in sorted(hook_names()):
            methods = tuple(m for c in self.concerns if callable(m := getattr(c, name, None)))
            if not methods:
                continue
            setattr(self, name, _dispatch(methods))


def _dispatch(methods: tuple[Callable[..., object], ...]) -> Callable[..., Awaitable[None] | None]:
    def hook(*args: object) -> Awaitable[None] | None:
        for i, method in enumerate(methods):
            try:
                result = method(*args)
            except (exceptions.AddonHalt, exceptions.OptionsError):
                raise
            except Exception as e:
                _addon_error(e)
                continue
            if result is not None and inspect.isawaitable(result):
                return _rest(result, methods[i + 1 :], args)
        return None

    return hook


async def _rest(pending: Awaitable[object], methods: tuple[Callable[..., object], ...], args: tuple) -> None:
    """The hook from the first concern that had to wait: that wait, then the concerns after it, in order."""
    await _settle(pending)
    for method in methods:
        try:
            result = method(*args)
        except (exceptions.AddonHalt, exceptions.OptionsError):
            raise
        except Exception as e:
            _addon_error(e)
            continue
        if result is not None and inspect.isawaitable(result):
            await _settle(result)


async def _settle(pending: Awaitable[object]) -> None:
    try:
        await pending
    except (exceptions.AddonHalt, exceptions.OptionsError):
        raise
    except Exception as e:
        _addon_error(e)


def _addon_error(e: Exception) -> None:
    log.error(f"Addon error: {e}", exc_info=True)
