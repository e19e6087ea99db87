"""How a page answers: rendered with its CSRF token, and a form's post as a 303 or the page again with why not."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates


@dataclass(frozen=True)
class Page:
    """The request a page answers, the templates and the session's CSRF token (its forms and the nav carry it)."""

    request: Request
    templates: Jinja2Templates
    csrf: str

    def render(self, template: str, context: dict[str, Any], status_code: int = 200) -> HTMLResponse:
        context = {**context, "csrf": self.csrf}
        return self.templates.TemplateResponse(self.request, template, context, status_code=status_code)


def see_other(url: str) -> RedirectResponse:
    """Where a form's post lands: a GET, so reloading that page changes nothing."""
    return RedirectResponse(url, status_code=303)


def done_or_refused(change: Callable[[], str], refused: Callable[..., Response], *, missing_raises: bool = False):
    """Make a form's change and 303 to the URL it returns; refused (an HTTPException), the form's page again:
    `refused(status_code, error=sentence)`. With `missing_raises` a 404 (the page's own object is gone) is raised."""
    try:
        url = change()
    except HTTPException as e:
        if missing_raises and e.status_code == 404:
            raise
        return refused(e.status_code, error=e.detail)
    return see_other(url)
