"""The request headers that label a flow: `x-keyrotor-tags: a,b` and `x-keyrotor-session: ID`.

Read once per request (addons/tags.py), recorded with the flow, and never sent upstream.
A value outside these rules is refused with a 400 rather than dropped: a client that
tags its requests wants to know its tags were not kept.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from core.errors import OpenAIError

TAGS_HEADER = "x-keyrotor-tags"
SESSION_HEADER = "x-keyrotor-session"
HEADERS = frozenset({TAGS_HEADER.encode(), SESSION_HEADER.encode()})
MAX_TAGS = 10
MAX_TAG_CHARS = 64
MAX_SESSION_CHARS = 128
# Letters, digits and . _ : / @ - : safe in a URL, a filter field and a log line alike.
_TAG = re.compile(rf"[A-Za-z0-9._:/@-]{{1,{MAX_TAG_CHARS}}}")
_SESSION = re.compile(rf"[A-Za-z0-9._:/@-]{{1,{MAX_SESSION_CHARS}}}")
TAG_RULE = f"at most {MAX_TAGS} tags, each 1-{MAX_TAG_CHARS} letters, digits or . _ : / @ -, separated by commas"
SESSION_RULE = f"1-{MAX_SESSION_CHARS} letters, digits or . _ : / @ -"


@dataclass(frozen=True)
class Labels:
    """A flow's tags (in the order given, without repeats) and session id."""

    tags: tuple[str, ...] = ()
    session: str | None = None

    @property
    def tags_text(self) -> str | None:
        """As the flow's row keeps them: comma-separated, None for none."""
        return ",".join(self.tags) or None


class LabelError(ValueError):
    def __init__(self, header: str, rule: str) -> None:
        super().__init__(f"The {header} header must be {rule}.")
        self.header = header

    def error(self) -> OpenAIError:
        code = "invalid_keyrotor_tags" if self.header == TAGS_HEADER else "invalid_keyrotor_session"
        return OpenAIError(400, str(self), "invalid_request_error", code, {"x-should-retry": "false"})


def is_tag(text: str) -> bool:
    return bool(_TAG.fullmatch(text))


def is_session(text: str) -> bool:
    return bool(_SESSION.fullmatch(text))


def labels_of(fields: tuple[tuple[bytes, bytes], ...]) -> Labels | None:
    """The labels a request's headers carry (None: neither header); LabelError for a bad value.

    Repeated tag headers add up; repeated session headers must agree.
    """
    tags: list[str] = []
    sessions: list[str] = []
    seen = False
    for raw_name, raw_value in fields:
        name = raw_name.lower()
        if name not in HEADERS:
            continue
        seen = True
        value = raw_value.decode("latin-1").strip()
        if name == b"x-keyrotor-tags":
            for tag in value.split(","):
                tag = tag.strip()
                if not tag:
                    continue
                if not is_tag(tag):
                    raise LabelError(TAGS_HEADER, TAG_RULE)
                if tag not in tags:
                    tags.append(tag)
        else:
            if not is_session(value):
                raise LabelError(SESSION_HEADER, SESSION_RULE)
            sessions.append(value)
    if not seen:
        return None
    if len(tags) > MAX_TAGS:
        raise LabelError(TAGS_HEADER, TAG_RULE)
    if len(set(sessions)) > 1:
        raise LabelError(SESSION_HEADER, SESSION_RULE + ", one value per request")
    return Labels(tuple(tags), sessions[0] if sessions else None)


def without_labels(fields: tuple[tuple[bytes, bytes], ...]) -> tuple[tuple[bytes, bytes], ...]:
    """The headers less keyrotor's own labels: what may go upstream."""
    return tuple((name, value) for name, value in fields if name.lower() not in HEADERS)
