"""Who is calling: every request must carry a client key that keyrotor issued."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from mitmproxy import ctx, http

from addons.credentials import credential_from, replace_credential
from addons.errors import error_response
from addons.revisions import watch_revision
from storage import db
from storage.client_keys import Client, load_enabled
from storage.secrets import hash_client_key

log = logging.getLogger(__name__)

METADATA = "keyrotor.access"


def masked(key: str) -> str:
    return f"{key[:3]}…{key[-4:]}" if len(key) > 10 else "…"


class Access:
    def __init__(self) -> None:
        self.clients: dict[str, Client] = {}
        self.db_path: Path | None = None
        self._watcher: asyncio.Task | None = None

    def configure(self, updated: set[str]) -> None:
        if "keyrotor_storage" in updated:
            self.db_path = Path(ctx.options.keyrotor_storage)
            self._reload()

    def running(self) -> None:
        self._watcher = asyncio.create_task(watch_revision(self.db_path, "clients", self._reload, self._revision))

    def done(self) -> None:
        if self._watcher:
            self._watcher.cancel()

    def _reload(self) -> None:
        conn = db.connect(self.db_path)
        try:
            self._revision = db.read_revision(conn, "clients")
            self.clients = load_enabled(conn)
        finally:
            conn.close()
        log.info("client keys loaded: %d enabled", len(self.clients))

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        # Checked as soon as the headers arrive, so the client's key can be replaced by a
        # placeholder before any other addon (mitmweb's view snapshots flows here) sees it.
        key = credential_from(flow.request.headers)
        client = self.clients.get(hash_client_key(key)) if key else None
        if client is None:
            flow.metadata[METADATA] = {"rejected": "invalid_api_key" if key else "missing_api_key",
                                       "masked": masked(key) if key else None}  # fmt: skip
            return
        flow.metadata[METADATA] = {"client_id": client.id, "client_name": client.name}
        replace_credential(flow.request.headers, f"[client key #{client.id}]")

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response:
            return
        if METADATA not in flow.metadata:
            self.requestheaders(flow)  # a flow that skipped the requestheaders hook (replayed, injected)
        verdict = flow.metadata[METADATA]
        if "client_id" in verdict:
            return
        if verdict["rejected"] == "missing_api_key":
            message = (
                "You didn't provide an API key. Send the key keyrotor issued to you as"
                " 'Authorization: Bearer <key>' (the api_key of your OpenAI client)."
            )
        else:
            message = (
                f"Incorrect API key provided: {verdict['masked']}. Use a key issued by this keyrotor"
                " gateway (run.py clients add NAME); upstream keys are not accepted here."
            )
        flow.response = error_response(401, message, "invalid_request_error", verdict["rejected"])
