"""The one model a request asks upstream for, read once: what the allowlist, routing, prices and budgets all read.

Upstream acts on the top-level `model` of a JSON body, the `model` field of a form
(multipart or urlencoded: relays bind forms too), the deployment of an Azure path
(`/openai/deployments/<name>/…`) and `?model=` (Realtime; relays read the query as well).
A name anywhere else (in `metadata`, a message, a tool) is not the request's model.

Where parsers may disagree, nothing is guessed: a request that names its model twice (a
duplicate key, `Model` beside `model`, a form field and a query that differ), or whose
model is not a non-empty string, is refused with a 400 before anything is sent. JSON
does not say which of two duplicate keys wins (Python and Go take the last, others the
first; OpenAI's parser is not known here), so a duplicate is refused rather than resolved.

Most bodies need no parse: once lowered, a body without `\\u` escapes can spell the key only as
`"model"`; when it appears once (else a byte pattern finds every spelling), and nothing before
or after it can nest it, it is the top-level key. Otherwise the body is parsed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qsl, unquote, unquote_to_bytes

from core.errors import OpenAIError
from core.metadata import MODEL, RequestedModel

BODY, FORM, QUERY, DEPLOYMENT = "body", "form", "query", "deployment"
AMBIGUOUS = "ambiguous_model"
INVALID = "invalid_model"

# A JSON key that is "model" in any case, each letter plain or \u-escaped, followed by its colon. It
# matches a superset of the real keys: `_is_key` drops matches that are not where a key starts. (Its
# first byte is a literal quote, so the scan runs at memchr speed through megabytes of base64; keys
# without quotes are not JSON, and not looked for.)
_MODEL_KEY = re.compile(
    rb'"(?:[mM]|\\u00[46][dD])(?:[oO]|\\u00[46][fF])(?:[dD]|\\u00[46]4)(?:[eE]|\\u00[46]5)(?:[lL]|\\u00[46][cC])"'
    rb"[ \t\r\n]*:[ \t\r\n]*"
)
_AFTER_KEY = re.compile(rb"[ \t\r\n]*:[ \t\r\n]*")
_PLAIN_STRING = re.compile(rb'"([^"\\]*)"')
_JSON_SPACE = b" \t\r\n"
_DEPLOYMENT = re.compile(r"(?:^|/)openai/deployments/([^/?#]*)", re.I)
_BOUNDARY = re.compile(r'boundary=(?:"([^"]+)"|([^;\s]+))', re.I)
_DISPOSITION = re.compile(rb"^content-disposition[ \t]*:(.*)$", re.I | re.M)
_NAME_PARAM = re.compile(rb'(?:^|;)[ \t]*name(\*?)[ \t]*=[ \t]*("(?:[^"\\]|\\.)*"|[^;\s]*)', re.I)
_FILE_PARAM = re.compile(rb"(?:^|;)[ \t]*filename\*?[ \t]*=", re.I)
_TRANSFER_ENCODING = re.compile(rb"^content-transfer-encoding[ \t]*:", re.I | re.M)


NONE = RequestedModel(None)  # the request names no model


def ambiguous(message: str) -> OpenAIError:
    return OpenAIError(400, message, "invalid_request_error", AMBIGUOUS, {"x-should-retry": "false"})


def invalid(message: str) -> OpenAIError:
    return OpenAIError(400, message, "invalid_request_error", INVALID, {"x-should-retry": "false"})


def request_model(
    path: str, fields: tuple[tuple[bytes, bytes], ...], body: bytes | None, decoded: Callable[[], bytes | None]
) -> RequestedModel | OpenAIError:
    """The model `path`, headers and `body` ask upstream for, or why that cannot be said.

    `decoded` gives the body without its content-encoding (it raises ValueError when it cannot).
    """
    content_type = encoding = b""
    for name, value in fields:
        if len(name) in (12, 16):  # content-type, content-encoding: most headers are neither, by length
            lowered = name.lower()
            if lowered == b"content-type":
                content_type = value
            elif lowered == b"content-encoding":
                encoding = value
    found: list[RequestedModel] = []
    if "deployments" in path.lower():
        deployment = _DEPLOYMENT.search(path.partition("?")[0])
        if deployment is not None:
            found.append(RequestedModel(unquote(deployment.group(1)), DEPLOYMENT))
    if "?" in path:
        from_query = _query_model(path.partition("?")[2])
        if isinstance(from_query, OpenAIError):
            return from_query
        if from_query.model is not None:
            found.append(from_query)
    if body:
        if encoding.strip() and encoding.strip().lower() != b"identity":
            try:
                body = decoded() or b""
            except ValueError:
                return invalid(
                    f"The request body is encoded as {encoding.decode('latin-1')!r}, which keyrotor cannot read,"
                    " so its model cannot be checked; send it uncompressed or gzip-, deflate-, br- or zstd-encoded."
                )
        from_body = body_model(content_type.decode("latin-1"), body)
        if isinstance(from_body, OpenAIError):
            return from_body
        if from_body.model is not None:
            found.append(from_body)
    if not found:
        return NONE
    names = {f.model for f in found}
    if len(names) > 1:
        where = ", ".join(f"{f.source} {f.model!r}" for f in found)
        return ambiguous(f"This request names two different models ({where}); name the model once.")
    for named in found:
        if not named.model:
            return invalid(f"The request's model ({named.source}) is empty; name the model to use.")
    return found[0]


def model_of(
    metadata: dict[str, Any],
    path: str,
    fields: tuple[tuple[bytes, bytes], ...],
    body: bytes | None,
    decoded: Callable[[], bytes | None],
) -> RequestedModel | OpenAIError:
    """The request's model as the first addon that asked read it, kept in the flow's metadata for the others."""
    known = RequestedModel.of(metadata)
    if known is not None:
        return known
    found = request_model(path, fields, body, decoded)
    if not isinstance(found, OpenAIError):
        metadata[MODEL] = found
    return found


def body_model(content_type: str, body: bytes) -> RequestedModel | OpenAIError:
    """The model a body names: a form's field, or a JSON object's top-level key."""
    lowered = content_type.lower()
    if "multipart/form-data" in lowered:
        return _multipart_model(content_type, body)
    if "application/x-www-form-urlencoded" in lowered:
        return _urlencoded_model(body)
    if b"\x00" in body[:4] or body[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return _foreign_json(body)
    start = _first_byte(body)
    first = body[start : start + 1]
    if first == b"{":
        return json_model(body, start)
    if "json" in lowered and first not in (b"", b"["):
        return invalid("The request body is not a JSON object, so its model cannot be read.")
    return NONE  # not a JSON object, not a form (audio, SDP, a file's bytes): it names no model


def _first_byte(body: bytes) -> int:
    """Where a JSON document starts: after blanks and a UTF-8 byte order mark (Python's parser skips one)."""
    start = 3 if body[:3] == b"\xef\xbb\xbf" else 0
    while body[start : start + 1] in (b" ", b"\t", b"\r", b"\n"):
        start += 1
    return start


# --------------------------------------------------------------------------- JSON


def json_model(body: bytes, start: int = 0) -> RequestedModel | OpenAIError:
    """The top-level `model` of the JSON object in `body` (which opens at `start`)."""
    lowered = body.lower()
    if b"\\u00" not in lowered:  # no escapes: every spelling of the key is `"model"` once lowered
        first = lowered.find(b'"model"')
        if first < 0:
            return NONE
        if lowered.find(b'"model"', first + 7) < 0:  # one candidate: it is the key, or there is none
            after = _AFTER_KEY.match(body, first + 7)
            if after is None or not _is_key(body, first):
                return NONE  # a value ("role": "model"), not a key
            return _settled(body, start, first, after.end())
    keys = [m for m in _MODEL_KEY.finditer(body) if _is_key(body, m.start())]
    if not keys:
        return NONE
    if len(keys) == 1:
        return _settled(body, start, keys[0].start(), keys[0].end())
    return _parsed_model(body)


def _settled(body: bytes, start: int, key: int, value_at: int) -> RequestedModel | OpenAIError:
    """The one model key's value, when nothing can nest the key or spell it otherwise; else the parser's say."""
    value = _PLAIN_STRING.match(body, value_at)
    if value is not None and body[key : key + 7] == b'"model"' and _top_level(body, start, key, value.end()):
        return RequestedModel(value.group(1).decode("utf-8", "replace"), BODY)
    return _parsed_model(body)


def _is_key(body: bytes, at: int) -> bool:
    """A real key's quote follows `{` or `,`; a quote inside a string follows its backslash."""
    at -= 1
    while at >= 0 and body[at] in _JSON_SPACE:
        at -= 1
    return at >= 0 and body[at] in b"{,"


def _top_level(body: bytes, start: int, key: int, value_end: int) -> bool:
    """Whether the key at `key` is certainly one of the outer object's: nothing before it, or after
    its value, could open another object or array (braces inside strings make this say no, never yes)."""
    if body.count(b"{", start, key) == 1 and body.find(b"[", start, key) < 0:
        return True
    return body.count(b"}", value_end) == 1 and not any(body.find(c, value_end) >= 0 for c in (b"{", b"[", b"]"))


def _parsed_model(body: bytes) -> RequestedModel | OpenAIError:
    """The slow way, for the rare body the pattern cannot settle: the parser's own view of the outer object."""
    try:
        document = json.loads(body, object_pairs_hook=_pairs)
    except (ValueError, RecursionError):
        return invalid("The request body is not valid JSON, so its model cannot be read.")
    if not isinstance(document, _Pairs):
        return NONE
    return _named_in(document, BODY, "key")


class _Pairs(list[tuple[str, Any]]):
    """A JSON object as its key-value pairs in order, duplicates kept."""


def _pairs(pairs: list[tuple[str, Any]]) -> _Pairs:
    return _Pairs(pairs)


def _named_in(pairs: list[tuple[str, Any]], source: str, what: str) -> RequestedModel | OpenAIError:
    """The one `model` among `pairs`; refused when twice, in another case, or not a string."""
    named = [(k, v) for k, v in pairs if k.lower() == "model"]
    if not named:
        return NONE
    if len(named) > 1:
        shown = ", ".join(f"{k!r}: {_shown(v)}" for k, v in named)
        return ambiguous(
            f"The request names its model {len(named)} times ({shown}); parsers differ on which one counts,"
            f" so send one {what} 'model'."
        )
    key, value = named[0]
    if key != "model":
        return invalid(f"The request names its model with the {what} {key!r}; spell it 'model'.")
    if not isinstance(value, str):
        return invalid(f"The request's 'model' must be a string, not {_shown(value)}.")
    return RequestedModel(value, source)


def _shown(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, _Pairs) else "an object"
    return text if len(text) <= 80 else text[:77] + "..."


def _foreign_json(body: bytes) -> RequestedModel | OpenAIError:
    """A body in UTF-16 or UTF-32: Python's JSON parser reads those, so one upstream might."""
    try:
        encoding = json.detect_encoding(body)
        text = body[:64].decode(encoding, "ignore").lstrip()
    except (LookupError, ValueError):
        return NONE
    if text[:1] in ("{", "["):
        return invalid(f"The request body is JSON in {encoding}; send it as UTF-8.")
    return NONE


def renamed_top_model(body: bytes, old: str, new: str) -> bytes:
    """`body` with its top-level `"model": "<old>"` saying `new` (an alias's upstream name): a nested
    "model" (a decoy in `metadata`, a message) is left alone, and the other bytes stay as they came."""
    if old == new:
        return body
    keys = [m for m in _MODEL_KEY.finditer(body) if _is_key(body, m.start())]
    if len(keys) > 1:
        depths = _depths(body, [k.start() for k in keys])
        keys = [k for k, depth in zip(keys, depths, strict=True) if depth == 1]
    if len(keys) != 1:
        return body
    start = keys[0].end()
    end = _string_end(body, start)
    try:
        if end < 0 or json.loads(body[start:end]) != old:
            return body
    except ValueError:
        return body
    return body[:start] + json.dumps(new).encode() + body[end:]


def _depths(body: bytes, positions: list[int]) -> list[int]:
    """How deeply each of `positions` (in order, each outside any string) is nested: 1 in the outer object."""
    depths: list[int] = []
    depth = at = 0
    for target in positions:
        while at < target:
            quote = body.find(b'"', at, target)
            stop = target if quote < 0 else quote
            depth += body.count(b"{", at, stop) + body.count(b"[", at, stop)
            depth -= body.count(b"}", at, stop) + body.count(b"]", at, stop)
            if quote < 0:
                break
            at = _string_end(body, quote)
            if at < 0:
                return depths + [0] * (len(positions) - len(depths))
        at = target
        depths.append(depth)
    return depths


def _string_end(body: bytes, quote: int) -> int:
    """Where the JSON string opening at `quote` ends (after its closing quote), -1 if it does not."""
    if body[quote : quote + 1] != b'"':
        return -1
    at = quote + 1
    while True:
        at = body.find(b'"', at)
        if at < 0:
            return -1
        backslashes = 0
        while body[at - 1 - backslashes] == 0x5C:
            backslashes += 1
        if backslashes % 2 == 0:
            return at + 1
        at += 1


# --------------------------------------------------------------------------- forms and URLs


def _query_model(query: str) -> RequestedModel | OpenAIError:
    if "odel" not in query.lower() and "%" not in query:
        return NONE
    return _named_in(parse_qsl(query, keep_blank_values=True), QUERY, "query parameter")


def _urlencoded_model(body: bytes) -> RequestedModel | OpenAIError:
    if b"odel" not in body.lower() and b"%" not in body:
        return NONE
    pairs = [(k.decode("utf-8", "replace"), v.decode("utf-8", "replace")) for k, v in parse_qsl(body, True)]
    return _named_in(pairs, FORM, "form field")


def _multipart_model(content_type: str, body: bytes) -> RequestedModel | OpenAIError:
    """The `model` field of a multipart form."""
    pairs: list[tuple[str, Any]] = []
    for names, head, start, end in _form_parts(content_type, body):
        for name in names:
            if name.lower() != "model":
                continue
            if _FILE_PARAM.search(head) or _TRANSFER_ENCODING.search(head):
                return invalid("The form's 'model' must be a plain field: not a file, and not transfer-encoded.")
            pairs.append((name, body[start:end].decode("utf-8", "replace")))
    return _named_in(pairs, FORM, "form field")


def _form_parts(content_type: str, body: bytes) -> Iterator[tuple[list[str], bytes, int, int]]:
    """A multipart form's parts, read part by part as a form parser would (the preamble before the
    first boundary and the epilogue after the last are not parts): (names, headers, value's start, end)."""
    boundary = _BOUNDARY.search(content_type)
    if boundary is None:
        return  # upstream cannot read the form either
    delimiter = b"--" + (boundary.group(1) or boundary.group(2)).encode("latin-1")
    at = _next_delimiter(body, delimiter, 0)
    while at >= 0:
        after = at + len(delimiter)
        if body[after : after + 2] == b"--":
            break  # the closing delimiter
        head_start = body.find(b"\n", after) + 1
        head_end, value_start = _headers_end(body, head_start)
        if head_start == 0 or head_end < 0:
            break
        following = _next_delimiter(body, delimiter, value_start)
        head = re.sub(rb"\r?\n[ \t]+", b" ", body[head_start:head_end])  # folded header lines unfolded
        end = following - 1 if following >= 0 else len(body)  # the line break before the delimiter
        if end > value_start and body[end - 1 : end] == b"\r":
            end -= 1
        yield _field_names(head), head, value_start, end
        at = following


def _next_delimiter(body: bytes, delimiter: bytes, start: int) -> int:
    """Where the next boundary line starts, -1 if none: the delimiter at the body's start or after a
    line break, followed by `--`, blanks or the line's end (anything else is data that looks like one)."""
    at = 0 if start == 0 and body.startswith(delimiter) else -1
    while True:
        if at < 0:
            found = body.find(b"\n" + delimiter, start)
            if found < 0:
                return -1
            at = found + 1
        rest = body[at + len(delimiter) : at + len(delimiter) + 2]
        if rest[:1] in (b"", b"\r", b"\n", b" ", b"\t") or rest == b"--":
            return at
        start, at = at, -1


def _headers_end(body: bytes, start: int) -> tuple[int, int]:
    """Where a part's headers end and its value starts (after a blank line, CRLF or LF)."""
    if body[start : start + 2] == b"\r\n":
        return start, start + 2  # no headers
    if body[start : start + 1] == b"\n":
        return start, start + 1
    crlf, lf = body.find(b"\r\n\r\n", start), body.find(b"\n\n", start)
    if crlf >= 0 and (lf < 0 or crlf < lf):
        return crlf, crlf + 4
    if lf >= 0:
        return lf, lf + 2
    return -1, -1


def _field_names(head: bytes) -> list[str]:
    """Every name a part's headers give it (a parser takes one of them; which one, they differ)."""
    names = []
    for disposition in _DISPOSITION.finditer(head):
        for extended, value in _NAME_PARAM.findall(disposition.group(1).strip()):
            if value[:1] == b'"':
                value = re.sub(rb"\\(.)", rb"\1", value[1:-1])
            if extended:  # RFC 2231: charset'language'percent-encoded
                value = unquote_to_bytes(value.split(b"'", 2)[-1].decode("latin-1"))
            names.append(value.decode("utf-8", "replace"))
    return names


# --------------------------------------------------------------------------- batch input files

_IDENTITY_TRANSFER = re.compile(rb"^content-transfer-encoding[ \t]*:[ \t]*(?:7bit|8bit|binary)[ \t]*$", re.I | re.M)


def batch_input_files(content_type: str, body: bytes) -> list[bytes] | OpenAIError:
    """The files a multipart upload sends as a batch's input: its `file` fields when a `purpose` field
    says `batch` (in any case, as a lenient upstream might read it), else none."""
    purposes: list[bytes] = []
    files: list[tuple[int, int]] = []  # where each file's bytes are: copied only when they are a batch's
    for names, head, start, end in _form_parts(content_type, body):
        lowered = {name.lower() for name in names}
        if not lowered & {"purpose", "file"}:
            continue
        if _TRANSFER_ENCODING.search(head) and not _IDENTITY_TRANSFER.search(head):
            return invalid(
                "The form's 'file' and 'purpose' must not be transfer-encoded, so the batch's models can be read."
            )
        if "purpose" in lowered:
            purposes.append(body[start:end])
        if "file" in lowered:
            files.append((start, end))
    if not any(purpose.strip().lower() == b"batch" for purpose in purposes):
        return []
    return [body[start:end] for start, end in files]


def batch_models(data: bytes) -> list[tuple[int, str]] | OpenAIError:
    """The model each line of a batch's input file (JSON Lines, one request a line) names in its `body`,
    with the line's number; or why a line's model cannot be read (a refusal that names the line)."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return invalid("The batch input file is not UTF-8 text, so the models its lines name cannot be read.")
    found: list[tuple[int, str]] = []
    for number, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")  # CRLF line breaks
        if not line.strip(" \t\r"):
            continue  # a blank line (the one after the last line break, usually) names nothing
        if "\r" in line:
            # JSON's blank between tokens, but a line break to a reader that splits lines at CR: it
            # would read other lines here, and a lenient one might find another request in them.
            return invalid(f"Line {number} of the batch input file holds a lone CR; end lines with LF or CRLF.")
        named = _line_model(number, line)
        if isinstance(named, OpenAIError):
            return named
        found.append((number, named))
    return found


def _line_model(number: int, line: str) -> str | OpenAIError:
    """The model one line's `body` names."""
    lowered = line.lower()
    if "\\u00" not in lowered and lowered.count('"model"') == 1 and lowered.count('"body"') == 1:
        # Each key spelled once, in one case: the parser's plain objects cannot hide a duplicate (3× faster).
        try:
            document = json.loads(line)
        except (ValueError, RecursionError):
            document = None
        body = document.get("body") if isinstance(document, dict) else None
        model = body.get("model") if isinstance(body, dict) else None
        if isinstance(model, str) and model:
            return model
    try:
        document = json.loads(line, object_pairs_hook=_pairs)
    except (ValueError, RecursionError):
        return invalid(f"Line {number} of the batch input file is not valid JSON, so its model cannot be read.")
    if not isinstance(document, _Pairs):
        return invalid(f"Line {number} of the batch input file is not a JSON object, so its model cannot be read.")
    bodies = [(key, value) for key, value in document if key.lower() == "body"]
    if len(bodies) != 1 or bodies[0][0] != "body" or not isinstance(bodies[0][1], _Pairs):
        return invalid(f"Line {number} of the batch input file needs one 'body' object that names its model.")
    named = _named_in(bodies[0][1], BODY, "key")
    if isinstance(named, OpenAIError):
        return OpenAIError(
            400, f"Line {number} of the batch input file: {named.message}", named.type, named.code, named.headers
        )
    if not named.model:
        return invalid(f"Line {number} of the batch input file names no model in its 'body'; name one as a string.")
    return named.model


def batch_upload_purpose(body: bytes) -> bool:
    """Whether a JSON body creating an upload (POST /v1/uploads) gives it the purpose `batch`."""
    if b"atch" not in body.lower():
        return False
    try:
        document = json.loads(body, object_pairs_hook=_pairs)
    except (ValueError, RecursionError):
        return False  # upstream cannot read it either
    if not isinstance(document, _Pairs):
        return False
    return any(
        key.lower() == "purpose" and isinstance(value, str) and value.strip().lower() == "batch"
        for key, value in document
    )
