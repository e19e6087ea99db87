"""Who is calling: every request must carry a client key that keyrotor issued."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from mitmproxy import ctx, http

from core.credentials import credential_from, masked, query_credential, refused_placeholder, scrubbed
from core.errors import OpenAIError
from core.metadata import ACCESS, AccessVerdict
from core.models import Client
from core.revisions import watch_revision
from storage import db
from storage.client_keys import load_enabled
from storage.secrets import hash_client_key

log = logging.getLogger(__name__)


def refusal(verdict: AccessVerdict) -> OpenAIError:
    if verdict.rejected == "missing_api_key":
        message = (
            "You didn't provide an API key. Send the key keyrotor issued to you as"
            " 'Authorization: Bearer <key>' (the api_key of your OpenAI client)."
        )
    else:
        message = (
            f"Incorrect API key provided: {verdict.masked}. Use a key issued by this keyrotor"
            " gateway (run.py clients add NAME); upstream keys are not accepted here."
        )
    return OpenAIError(401, message, "invalid_request_error", verdict.rejected)


class Access:
    def __init__(self) -> None:
        self.clients: dict[str, Client] = {}
        self.db_path: Path | None = None
        self._revision = 0
        self._revisions: db.RevisionReader | None = None
        self._watcher: asyncio.Task | None = None

    def configure(self, updated: set[str]) -> None:
        if "keyrotor_storage" in updated:
            self.db_path = Path(ctx.options.keyrotor_storage)
            self._reload()

    def running(self) -> None:
        self._revisions = db.RevisionReader(self.db_path)
        self._watcher = asyncio.create_task(watch_revision(self._revisions, "clients", self._reload, self._revision))

    def done(self) -> None:
        if self._watcher:
            self._watcher.cancel()
        if self._revisions:
            self._revisions.close()

    def _reload(self) -> None:
        conn = db.connect(self.db_path)
        try:
            self._revision = db.read_revision(conn, "clients")
            self.clients = load_enabled(conn)
        finally:
            conn.close()
        log.info("client keys loaded: %d enabled", len(self.clients))

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        # Checked as soon as the headers arrive, so every credential is replaced by a placeholder
        # before any other addon (mitmweb's view snapshots flows here) sees it, and a refusal is
        # answered before the body is read (addons/bounds.py sends it without reading on).
        request = flow.request
        query_key = None
        if "?" in request.path:
            query_key, path = query_credential(request.path)
            if path != request.path:
                request.path = path  # a key in the URL goes no further: not upstream, not into a record
        headers = request.headers
        key = credential_from(headers.fields) or query_key
        client = self.clients.get(hash_client_key(key)) if key else None
        if client is None:
            rejected = "invalid_api_key" if key else "missing_api_key"
            verdict = AccessVerdict(rejected=rejected, masked=masked(key) if key else None)
            flow.metadata[ACCESS] = verdict
            headers.fields = scrubbed(headers.fields, refused_placeholder(key))
            flow.response = as_response(refusal(verdict))
            return
        flow.metadata[ACCESS] = AccessVerdict(client_id=client.id, client_name=client.name)
        stand_in = f"[client key #{client.id}]"
        headers.fields = scrubbed(headers.fields, stand_in, ensure=True)

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response:
            return
        if ACCESS not in flow.metadata:
            self.requestheaders(flow)  # a flow that skipped the requestheaders hook (replayed, injected)


def as_response(error: OpenAIError) -> http.Response:
    return http.Response.make(error.status, error.body(), error.all_headers())
