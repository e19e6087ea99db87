"""Reading and replacing the credential a client sent, in either of the forms OpenAI SDKs use.

Works on raw header fields (name, value) so it serves mitmproxy's and httpx's headers
alike, in one pass: mitmproxy's Headers lower-cases every name on every lookup.
"""

from __future__ import annotations

AUTHORIZATION = b"authorization"
API_KEY = b"api-key"  # Azure OpenAI's form

Fields = tuple[tuple[bytes, bytes], ...]


def credential_from(fields: Fields) -> str | None:
    """`Authorization: Bearer <key>`, else `api-key: <key>`; None when neither carries one."""
    api_key = None
    for name, value in fields:
        lowered = name.lower()
        if lowered == AUTHORIZATION:
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip().decode("latin-1")
        elif lowered == API_KEY and value.strip():
            api_key = value.strip().decode("latin-1")
    return api_key


def with_credential(fields: Fields, value: str) -> Fields:
    """`value` wherever the client put its credential (Bearer and/or api-key); Bearer if nowhere."""
    encoded = value.encode()
    replaced = False
    result = []
    for name, old in fields:
        lowered = name.lower()
        if lowered == AUTHORIZATION:
            result.append((name, b"Bearer " + encoded))
            replaced = True
        elif lowered == API_KEY:
            result.append((name, encoded))
            replaced = True
        else:
            result.append((name, old))
    if not replaced:
        result.append((AUTHORIZATION, b"Bearer " + encoded))
    return tuple(result)


def masked(key: str) -> str:
    """A refused credential shortened beyond use, for the error message that names it."""
    return f"{key[:3]}…{key[-4:]}" if len(key) > 10 else "…"


def placeholder(key_id: int, last4: str) -> str:
    """What stands in a request's headers instead of an upstream key, wherever it can be seen."""
    return f"[upstream key #{key_id} ...{last4}]"  # ASCII: it sits in a header
