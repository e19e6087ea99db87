"""Reading and replacing the credential a client sent, in either of the forms OpenAI SDKs use.

Shared by access (the client's key) and keypool (the upstream key). One pass over the
header fields each: mitmproxy's Headers lower-cases every name on every lookup.
"""

from __future__ import annotations

from mitmproxy import http

AUTHORIZATION = b"authorization"
API_KEY = b"api-key"  # Azure OpenAI's form


def credential_from(headers: http.Headers) -> str | None:
    """`Authorization: Bearer <key>`, else `api-key: <key>`; None when neither carries one."""
    api_key = None
    for name, value in headers.fields:
        lowered = name.lower()
        if lowered == AUTHORIZATION:
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip().decode("latin-1")
        elif lowered == API_KEY and value.strip():
            api_key = value.strip().decode("latin-1")
    return api_key


def replace_credential(headers: http.Headers, value: str) -> None:
    """Put `value` wherever the client put its credential (Bearer and/or api-key); Bearer if nowhere."""
    encoded = value.encode()
    fields = []
    replaced = False
    for name, old in headers.fields:
        lowered = name.lower()
        if lowered == AUTHORIZATION:
            fields.append((name, b"Bearer " + encoded))
            replaced = True
        elif lowered == API_KEY:
            fields.append((name, encoded))
            replaced = True
        else:
            fields.append((name, old))
    if not replaced:
        fields.append((AUTHORIZATION, b"Bearer " + encoded))
    headers.fields = tuple(fields)
