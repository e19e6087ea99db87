"""What keyrotor changed on the way: the client's request beside the one sent upstream.

A flow's record keeps the request as it went upstream (its first attempt: the pooled key
as a placeholder, a renamed model, injected `stream_options`, an Azure path). Beside it,
`client_request` keeps only how the client's differed: its path, its headers (credentials
as keyrotor's placeholders, never a value), and the body's top-level changes as
`{"set": {key: the client's value}, "drop": [keys the client did not send]}` rather than a
second copy of the body. From these the flow page shows the diff, and a replay rebuilds
what the client sent.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from core.bodies import json_object

HeaderFields = tuple[tuple[bytes, bytes], ...]
CREDENTIAL_HEADERS = frozenset(
    {"authorization", "api-key", "proxy-authorization", "x-api-key", "cookie", "set-cookie", "x-keyrotor-pass"}
)
# The stand-ins keyrotor itself puts where a credential was (core/credentials.py placeholder, addons/access.py):
# these, and only these, are shown; anything else in a credential header is "[redacted]".
PLACEHOLDER = re.compile(
    r"(Bearer )?\[(upstream key #\d+ \.\.\.[A-Za-z0-9_-]{0,4}|client key #\d+|pass for client #\d+"
    r"|refused key( \.\.\.[A-Za-z0-9_-]{0,4})?|refused pass)\]"
)
REDACTED = "[redacted]"
CREDENTIAL_NAMES = frozenset(n.encode() for n in CREDENTIAL_HEADERS)


def shown_value(name: str, value: str) -> str:
    """A header's value as a page may show it: a credential only as keyrotor's placeholder."""
    if name.lower() in CREDENTIAL_HEADERS and not PLACEHOLDER.fullmatch(value):
        return REDACTED
    return value


def shown_headers(fields: HeaderFields) -> list[list[str]]:
    rows = []
    for raw_name, raw_value in fields:
        name = raw_name.decode("latin-1")
        rows.append([name, shown_value(name, raw_value.decode("latin-1"))])
    return rows


def shown_request(kept: dict[str, Any] | None) -> dict[str, Any] | None:
    """A record's client_request as a page may show it: its credentials checked again on the way out,
    whatever the row holds (a row from elsewhere, an import)."""
    if not isinstance(kept, dict):
        return None
    shown = dict(kept)
    for name in ("headers", "sent_credentials"):
        rows = kept.get(name)
        if isinstance(rows, list):
            shown[name] = [[str(n), shown_value(str(n), str(v))] for n, v in (r for r in rows if len(r) == 2)]
    return shown


_MISSING = object()


def body_changes(client: bytes | None, sent: bytes | None) -> dict[str, Any] | None:
    """The top-level changes that turn the `sent` JSON object back into the `client`'s; None when the
    bodies are the same, or not both JSON objects (nothing to say in JSON terms)."""
    if client is None or sent is None or client is sent or client == sent:
        return None
    before, after = json_object(client), json_object(sent)
    if before is None or after is None:
        return None
    changes: dict[str, Any] = {}
    restored = {k: v for k, v in before.items() if after.get(k, _MISSING) != v}
    dropped = [k for k in after if k not in before]
    if restored:
        changes["set"] = restored
    if dropped:
        changes["drop"] = dropped
    return changes or None


def recorded_differences(recorded: bytes | None, sent: bytes | None) -> dict[str, Any] | None:
    """The top-level values of the `sent` JSON object that the `recorded` one shows otherwise (the
    record keeps the client's model name where upstream was sent its own)."""
    before = json_object(recorded) if recorded is not None else None
    after = json_object(sent) if sent is not None else None
    if before is None or after is None:
        return None
    return {k: v for k, v in after.items() if before.get(k, _MISSING) != v} or None


def client_request(
    client_path: str,
    client_fields: HeaderFields,
    client_body: bytes | None,
    sent_path: str,
    sent_url: str,
    sent_fields: HeaderFields,
    sent_body: bytes | None,
) -> dict[str, Any]:
    """What the record keeps of the client's request beside the sent one (see the module's docstring):
    the client's headers only where the sent ones differ (`headers`), the names of those the client did
    not send (`added`), and the credentials sent, as placeholders. Runs in the writer thread, per flow."""
    sent: dict[bytes, bytes] = {}
    credentials = []
    for name, value in sent_fields:
        lowered = name.lower()
        sent[lowered] = value
        if lowered in CREDENTIAL_NAMES:
            text = name.decode("latin-1")
            credentials.append([text, shown_value(text, value.decode("latin-1"))])
    seen = set()
    changed = []
    for name, value in client_fields:
        lowered = name.lower()
        seen.add(lowered)
        if sent.get(lowered) != value:
            text = name.decode("latin-1")
            changed.append([text, shown_value(text, value.decode("latin-1"))])
    kept: dict[str, Any] = {
        "url": sent_url,
        "headers": changed,
        "added": [n.decode("latin-1") for n in sent if n not in seen],
    }
    if client_path != sent_path:
        kept["path"] = client_path
    if credentials:
        kept["sent_credentials"] = credentials
    changes = body_changes(client_body, sent_body)
    if changes is not None:
        kept["body"] = changes
    return kept


def client_headers(sent_headers: list[list[str]], kept: dict[str, Any] | None) -> list[tuple[str, str]]:
    """The client's headers, rebuilt from the recorded (sent) ones and what the record kept of the client's."""
    if not kept:
        return [(n, v) for n, v in sent_headers]
    changed = {str(n).lower(): (str(n), str(v)) for n, v in kept.get("headers") or ()}
    added = kept.get("added")
    if added is None:  # recorded with every client header
        return list(changed.values())
    dropped = {str(n).lower() for n in added}
    rebuilt = []
    for name, value in sent_headers:
        lowered = name.lower()
        if lowered in dropped:
            continue
        rebuilt.append(changed.pop(lowered, (name, value)))
    return rebuilt + list(changed.values())  # and those keyrotor removed


def rebuilt_body(sent_text: str | None, changes: dict[str, Any] | None) -> str | None:
    """The client's body from the recorded (sent) one and the changes; None when it cannot be rebuilt
    (no body, or not a JSON object while there are changes to apply)."""
    if sent_text is None:
        return None
    if not changes:
        return sent_text
    try:
        body = json.loads(sent_text)
    except ValueError:
        return None
    if not isinstance(body, dict):
        return None
    for key in changes.get("drop") or ():
        body.pop(key, None)
    body.update(changes.get("set") or {})
    return json.dumps(body, ensure_ascii=False)


# --------------------------------------------------------------------------- the diff a page shows


@dataclass(frozen=True)
class Change:
    """One line of a request diff: a header or a body key, as the client sent it and as keyrotor did."""

    where: str  # "line", "header" or "body"
    name: str
    client: str | None  # None: the client did not send it
    sent: str | None  # None: keyrotor did not send it

    @property
    def kind(self) -> str:
        if self.client is None:
            return "added"
        if self.sent is None:
            return "removed"
        return "changed" if self.client != self.sent else "same"


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def request_diff(
    method: str,
    sent_path: str,
    sent_headers: list[list[str]],
    sent_body: str | None,
    kept: dict[str, Any] | None,
) -> list[Change]:
    """The changes between what the client sent and what went upstream, from a flow's record
    (`kept`: its client_request; None for flows recorded before it existed: no diff)."""
    kept = shown_request(kept)
    if not kept:
        return []
    sent_headers = [[n, shown_value(n, v)] for n, v in sent_headers]
    changes = []
    client_line = f"{method} {kept.get('path', sent_path)}"
    url = kept.get("url")
    if url:
        changes.append(Change("line", "request", client_line, f"{method} {url}"))
    client_headers = {n.lower(): (n, v) for n, v in kept.get("headers") or ()}
    credentials = {n.lower(): v for n, v in kept.get("sent_credentials") or ()}
    sent = {n.lower(): (n, credentials.get(n.lower(), v)) for n, v in sent_headers}
    for lowered, (name, value) in client_headers.items():
        after = sent.get(lowered)
        if after is None:
            changes.append(Change("header", name, value, None))
        elif after[1] != value:  # (a header the client sent as it went upstream is not kept)
            changes.append(Change("header", name, value, after[1]))
    added = kept.get("added")
    dropped = {str(n).lower() for n in added} if added is not None else None
    for lowered, (name, value) in sent.items():
        if (lowered in dropped) if dropped is not None else (lowered not in client_headers):
            changes.append(Change("header", name, None, value))
    body = kept.get("body") or {}
    parsed = json_object(sent_body.encode()) if sent_body and body else None
    if parsed is not None and isinstance(kept.get("sent_body"), dict):
        parsed = {**parsed, **kept["sent_body"]}  # as it went upstream, not as the record names it
    for key, value in (body.get("set") or {}).items():
        now = parsed.get(key, _MISSING) if parsed is not None else _MISSING
        changes.append(Change("body", key, _text(value), None if now is _MISSING else _text(now)))
    for key in body.get("drop") or ():
        now = parsed.get(key, _MISSING) if parsed is not None else _MISSING
        changes.append(Change("body", key, None, None if now is _MISSING else _text(now)))
    return changes
