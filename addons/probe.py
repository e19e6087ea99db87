"""A key's health check: GET /v1/models with it, which costs no tokens.

Used by the proxy's scheduled re-validation, `run.py keys validate` and the UI's API;
free of mitmproxy imports for the latter two.
"""

from __future__ import annotations

import time

import httpx

from addons.classify import OK, Outcome, classify_response, connection_failure


async def probe(client: httpx.AsyncClient, upstream: str, value: str) -> Outcome:
    """The outcome of one GET /v1/models with `value` against `upstream` (scheme://host[:port])."""
    try:
        response = await client.get(f"{upstream.rstrip('/')}/v1/models", headers={"authorization": f"Bearer {value}"})
    except httpx.HTTPError as e:
        return connection_failure(f"{type(e).__name__}: {e}")
    # Anything but a key failure (a 404 from a server without /v1/models, say) means the key got in.
    outcome = classify_response(response.status_code, response.headers, response.content, time.time())
    return outcome if outcome is not None and outcome.is_key_failure else OK
