"""mitmweb asks for the admin key of now, and never writes it to the log.

mitmweb gets the admin key's argon2 hash as its `web_password` when the proxy starts, and
signs its login cookies with a secret of its own. When the stored admin key changes
(`run.py admin rotate`), this addon gives mitmweb the new hash, a new cookie secret (every
mitmweb login ends) and closes the open /updates websockets, which were let in with the
old key. mitmweb also takes the key as `?token=`, and its web server logs every request
line: the token is taken out of those lines.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re

from mitmproxy import ctx

from core.ports import AdminKeys

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0
TOKEN_PARAMETER = re.compile(r"([?&]token=)[^&\s]*")


class WithoutToken(logging.Filter):
    """Takes mitmweb's `?token=<admin key>` out of the web server's request lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args and isinstance(record.args, tuple):
            record.args = tuple(
                TOKEN_PARAMETER.sub(r"\1[redacted]", arg) if isinstance(arg, str) else arg for arg in record.args
            )
        elif isinstance(record.msg, str) and "token=" in record.msg:
            record.msg = TOKEN_PARAMETER.sub(r"\1[redacted]", record.msg)
        return True


ACCESS_LOG = logging.getLogger("tornado.access")


class AdminKeyWatch:
    def __init__(self, admin_keys: AdminKeys | None = None) -> None:
        self.admin_keys = admin_keys  # the runtime's (addons/runtime.py)
        self._version: object = None
        self._task: asyncio.Task | None = None

    def running(self) -> None:
        if "web_password" not in ctx.options or self.admin_keys is None:
            return  # mitmdump: nothing asks for the admin key
        if not any(isinstance(f, WithoutToken) for f in ACCESS_LOG.filters):
            ACCESS_LOG.addFilter(WithoutToken())
        self._version = self.admin_keys.version()
        self._task = asyncio.create_task(self._watch(self.admin_keys))

    def done(self) -> None:
        if self._task:
            self._task.cancel()

    async def _watch(self, admin_keys: AdminKeys) -> None:
        while True:
            await asyncio.sleep(POLL_SECONDS)
            version = admin_keys.version()
            if version == self._version:
                continue
            self._version = version
            try:
                self._apply(admin_keys)
            except Exception:
                log.exception("could not give mitmweb the new admin key; restart the proxy")

    def _apply(self, admin_keys: AdminKeys) -> None:
        ctx.options.update(web_password=admin_keys.mitmweb_password())
        app = getattr(ctx.master, "app", None)
        if app is not None:
            from mitmproxy.tools.web.app import ClientConnection

            app.settings["cookie_secret"] = os.urandom(32)  # cookies signed with the old secret stop working
            for connection in list(ClientConnection.connections):
                connection.close()
        log.info("the admin key changed: mitmweb now asks for the new one")
