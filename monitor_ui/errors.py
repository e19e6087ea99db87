"""Storage's refusals as the UI's OpenAI-shaped HTTP errors, each with the sentence storage wrote."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from fastapi import HTTPException

from storage import routes


def sentence(error: Exception | str) -> str:
    """`no upstream named 'x'` → `No upstream named 'x'.`"""
    text = str(error).rstrip(".")
    return f"{text[:1].upper()}{text[1:]}."


@contextmanager
def refused_as_http() -> Iterator[None]:
    """NotFound → 404, Conflict → 409 (a name taken), any other ValueError → 422."""
    try:
        yield
    except routes.NotFound as e:
        raise HTTPException(404, sentence(e)) from None
    except routes.Conflict as e:  # a ValueError too: caught first
        raise HTTPException(409, sentence(e)) from None
    except ValueError as e:
        raise HTTPException(422, sentence(e)) from None


def enabling(action: str, noun: str) -> bool:
    """The JSON API's switch: enable → True, disable → False; any other action is a 404 naming the ones there are."""
    if action not in ("enable", "disable"):
        raise HTTPException(404, f"No {noun} action {action!r}; use enable or disable (DELETE to delete).")
    return action == "enable"
