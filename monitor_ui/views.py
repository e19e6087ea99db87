"""Turning stored rows into what pages and the JSON API show. Pure functions, no SQL."""

from __future__ import annotations

import json
import shlex
import sqlite3
from datetime import UTC, datetime
from typing import Any

from markupsafe import Markup, escape

from core.rewrites import shown_request


def iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def pretty_body(text: str | None) -> str | None:
    """JSON bodies indented for reading; anything else unchanged."""
    if not text or text[:1] not in "{[":
        return text
    try:
        return json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    except ValueError:
        return text


# The Responses API's text, Realtime's text and the transcript of what it said (GA and beta names), and
# a streamed transcription's text.
TEXT_DELTAS = frozenset(
    {
        "response.output_text.delta",
        "response.text.delta",
        "response.output_audio_transcript.delta",
        "response.audio_transcript.delta",
        "transcript.text.delta",  # a streamed transcription
    }
)


def text_delta(event: Any) -> list[str]:
    """The text pieces one streamed event adds: a chat or completions chunk's, or a Responses delta."""
    if not isinstance(event, dict):
        return []
    if event.get("type") in TEXT_DELTAS:
        delta = event.get("delta")
        return [delta] if isinstance(delta, str) else []
    parts = []
    for choice in event.get("choices") or []:
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta")
        content = delta.get("content") if isinstance(delta, dict) else choice.get("text")  # completions: text
        if isinstance(content, str):
            parts.append(content)
    return parts


def streamed_text(body: str | None) -> str | None:
    """The text a streamed answer carried, reassembled from its SSE events (chat, completions, Responses)."""
    if not body:
        return None
    parts = []
    for line in body.splitlines():
        if not line.startswith("data:"):
            continue
        try:
            event = json.loads(line[5:].strip())
        except ValueError:
            continue
        parts += text_delta(event)
    return "".join(parts) if parts else None


def event_type(text: str) -> str | None:
    """An SSE event's type: its `event:` line, else its JSON's `type` (Responses) or `object` (chat)."""
    data = []
    for line in text.splitlines():
        if line.startswith("event:"):
            return line[6:].strip() or None
        if line.startswith("data:"):
            data.append(line[5:].strip())
    try:
        payload = json.loads("\n".join(data))
    except ValueError:
        return None
    if not isinstance(payload, dict):
        return None
    kind = payload.get("type") or payload.get("object")
    return kind if isinstance(kind, str) else None


def first_byte_ms(started_at: float, first_byte_at: float | None) -> float | None:
    return round((first_byte_at - started_at) * 1000, 1) if first_byte_at else None


def flow_summary(row: sqlite3.Row) -> dict[str, Any]:
    summary = dict(row)
    summary["started_at"] = iso(row["started_at"])
    summary["stream"] = bool(row["stream"])
    summary["first_byte_ms"] = first_byte_ms(row["started_at"], summary.pop("first_byte_at", None))
    return summary


def flow_detail(row: sqlite3.Row) -> dict[str, Any]:
    detail = dict(row)
    for name in ("started_at", "first_byte_at", "ended_at"):
        detail[name] = iso(row[name])
    for name in ("request_headers", "response_headers", "chunk_times"):
        detail[name] = json.loads(row[name]) if row[name] else []
    kept = json.loads(row["client_request"]) if detail.get("client_request") else None
    detail["client_request"] = shown_request(kept)  # credentials only as keyrotor's placeholders
    detail["stream"] = bool(row["stream"])
    detail["streamed_text"] = streamed_text(row["response_body"]) if row["stream"] else None
    for side in ("request", "response"):
        kept = detail.pop(f"{side}_body_bytes", None)  # bytes are downloaded, never put in a page or JSON
        detail[f"{side}_body_kept_bytes"] = len(kept) if kept is not None else None
        detail[f"{side}_body_download"] = f"/flows/{row['id']}/download/{side}" if kept is not None else None
    messages = json.loads(row["websocket_messages"]) if row["websocket_messages"] else None
    detail["websocket_messages"] = [websocket_message(m) for m in messages] if messages is not None else None
    if messages is not None:
        detail["streamed_text"] = websocket_text(messages)
    detail["time_to_first_byte_ms"] = first_byte_ms(row["started_at"], row["first_byte_at"])
    return detail


def sse_events(body: str | None, chunk_times: list | None) -> list[dict[str, Any]]:
    """Each server-sent event with the time its last byte arrived, in ms after the first byte.

    `chunk_times` holds [ms, bytes] per read as captured; an event arrived with the read
    that carried its end.
    """
    if not body:
        return []
    reads = []
    position = 0
    for offset_ms, size in chunk_times or []:
        position += size
        reads.append((position, offset_ms))
    events = []
    encoded = body.encode("utf-8")
    start = 0
    read_index = 0
    while start < len(encoded):
        end = encoded.find(b"\n\n", start)
        end = len(encoded) if end == -1 else end + 2
        while read_index < len(reads) - 1 and reads[read_index][0] < end:
            read_index += 1
        text = encoded[start:end].decode("utf-8", errors="replace").strip()
        if text:
            offset = reads[read_index][1] if reads else None
            events.append({"offset_ms": offset, "type": event_type(text), "data": text})
        start = end
    return events


# File name extensions of the binary bodies OpenAI's endpoints send and take; anything else is .bin.
EXTENSIONS = {
    "audio/mpeg": "mp3",
    "audio/mp3": "mp3",
    "audio/wav": "wav",
    "audio/x-wav": "wav",
    "audio/wave": "wav",
    "audio/ogg": "ogg",
    "audio/opus": "opus",
    "audio/aac": "aac",
    "audio/flac": "flac",
    "audio/webm": "webm",
    "audio/mp4": "m4a",
    "audio/m4a": "m4a",
    "audio/pcm": "pcm",
    "image/png": "png",
    "image/jpeg": "jpg",
    "image/webp": "webp",
    "image/gif": "gif",
    "application/pdf": "pdf",
}


def file_extension(media_type: str | None) -> str:
    """A safe extension for a stored type (a fixed table: the captured type never reaches the file name)."""
    return EXTENSIONS.get((media_type or "").partition(";")[0].strip().lower(), "bin")


def websocket_message(stored: list) -> dict[str, Any]:
    """One stored WebSocket message ([ms, direction, kind, bytes, text]) with its event type."""
    offset_ms, direction, kind, size, text = stored
    event = None
    if text:
        try:
            payload = json.loads(text)
        except ValueError:
            payload = None
        event = payload.get("type") if isinstance(payload, dict) and isinstance(payload.get("type"), str) else None
    return {"offset_ms": offset_ms, "direction": direction, "kind": kind, "size": size, "type": event, "data": text}


def websocket_text(messages: list[list]) -> str | None:
    """The text a Realtime session's server sent, reassembled from its text delta events."""
    parts = []
    for _, direction, kind, _, text in messages:
        if direction == "server" and kind == "text" and text and "delta" in text:
            try:
                parts += text_delta(json.loads(text))
            except ValueError:
                continue
    return "".join(parts) if parts else None


# Never part of a copied command: connection details curl sets itself, and secrets.
CURL_SKIPPED = frozenset({"host", "content-length", "connection", "accept-encoding", "transfer-encoding"})


def curl_command(detail: dict[str, Any], origin: str) -> str:
    """The request as a curl command line against the proxy, with the client key left as $KEYROTOR_API_KEY."""
    parts = ["curl", "-X", detail["method"], shlex.quote(origin.rstrip("/") + detail["path"])]
    form = _stored_form(detail)
    for name, value in detail["request_headers"]:
        lowered = name.lower()
        if lowered in CURL_SKIPPED or (form is not None and lowered == "content-type"):  # curl sets the boundary
            continue
        if lowered in ("authorization", "api-key", "x-api-key"):
            value = "Bearer $KEYROTOR_API_KEY" if lowered == "authorization" else "$KEYROTOR_API_KEY"
            parts += ["-H", f'"{name}: {value}"']  # double quotes: the shell fills in the variable
            continue
        parts += ["-H", shlex.quote(f"{name}: {value}")]
    download = f"flow-{detail['id']}-request.{file_extension(detail.get('request_body_type'))}"
    if form is not None:  # an upload: its fields again, its file from the flow's download
        for name, value in form.items():
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, dict):
                    parts += ["-F", shlex.quote(f"{name}=@{download}")]
                elif isinstance(item, str):  # taken literally: a captured "@/etc/passwd" reads no file
                    parts += ["--form-string", shlex.quote(f"{name}={item}")]
    elif detail.get("request_body_type"):
        parts += ["--data-binary", shlex.quote(f"@{download}")]
    elif detail.get("request_body"):
        parts += ["--data-raw", shlex.quote(detail["request_body"])]
    return " ".join(parts)


def _stored_form(detail: dict[str, Any]) -> dict[str, Any] | None:
    """A multipart request's fields as capture stored them (JSON), or None for any other request."""
    content_type = next((v for n, v in detail["request_headers"] if n.lower() == "content-type"), "")
    if "multipart/form-data" not in content_type.lower() or not detail.get("request_body"):
        return None
    try:
        form = json.loads(detail["request_body"])
    except ValueError:
        return None
    return form if isinstance(form, dict) else None


def usage(row: sqlite3.Row) -> dict[str, Any]:
    """What an upstream key or a client has used, and when it was made (rows from storage's key and client lists)."""
    return {
        "requests": row["requests"],
        "prompt_tokens": row["prompt_tokens"],
        "completion_tokens": row["completion_tokens"],
        "cost": row["cost"],
        "last_used_at": row["last_used_at"],
        "created_at": row["created_at"],
    }


def group_summary(row: sqlite3.Row) -> dict[str, Any]:
    """A group as the pages and the JSON API show it (storage.routes.list_groups / get_group rows)."""
    return {
        "id": row["id"],
        "label": row["label"],
        "upstream": row["upstream"],
        "name": row["name"],
        "priority": row["priority"],
        "weight": row["weight"],
        "enabled": bool(row["enabled"]),
        "upstream_enabled": bool(row["upstream_enabled"]),
        # What the proxy does with it: a group of a disabled upstream serves nothing either.
        "serving": bool(row["enabled"] and row["upstream_enabled"]),
        "dialect": row["dialect"],
        "keys": row["keys"],
        "usable_keys": row["usable_keys"],
        "cannot_serve": cannot_serve(row["keys"], row["usable_keys"]),
        "models": row["models"],
        "every_model": not row["models"],
        "models_refreshed_at": row["models_refreshed_at"],
        "created_at": row["created_at"],
    }


def cannot_serve(keys: int, usable: int) -> str | None:
    """Why a group cannot serve a request now for want of a key (None: it has a usable one)."""
    if keys == 0:
        return "Cannot serve: no keys. Add one on the group's page."
    if usable == 0:
        return f"Cannot serve now: none of its {keys} key(s) is usable (invalid, exhausted, disabled or cooling)."
    return None


def breaks_at_slash(label: str) -> Markup:
    """An UPSTREAM/GROUP label that may wrap after its slash, as a word wraps, rather than inside a name."""
    return Markup("/<wbr>").join(escape(part) for part in str(label).split("/"))
