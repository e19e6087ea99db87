"""Admin sessions: an HMAC-signed cookie, and CSRF tokens bound to it. No server-side state."""

from __future__ import annotations

import hashlib
import hmac
import time
from pathlib import Path

from storage import secrets

SESSION_COOKIE = "keyrotor_session"
SESSION_SECONDS = 7 * 24 * 3600


class SessionSigner:
    def __init__(self, db_path: Path) -> None:
        # Bound to the admin key's hash: a new admin key logs every session out.
        self._key = hashlib.sha256(
            b"keyrotor-ui-session\0" + secrets.secret_bytes(db_path) + secrets.admin_key_hash(db_path).encode()
        ).digest()
        self._db_path = db_path

    def _sign(self, message: str) -> str:
        return hmac.new(self._key, message.encode(), hashlib.sha256).hexdigest()

    def check_admin_key(self, candidate: str) -> bool:
        return bool(candidate) and secrets.is_admin_key(self._db_path, candidate)

    def new_session(self, now: float | None = None) -> str:
        expires = int((now or time.time()) + SESSION_SECONDS)
        return f"{expires}.{self._sign(f'session:{expires}')}"

    def valid_session(self, token: str | None, now: float | None = None) -> bool:
        # The cookie is attacker-controlled: anything odd is simply not a session.
        if not token or len(token) > 200 or not token.isascii() or "." not in token:
            return False
        expires, _, signature = token.partition(".")
        if not expires.isdecimal() or int(expires) < (now or time.time()):
            return False
        return hmac.compare_digest(signature, self._sign(f"session:{expires}"))

    def csrf_token(self, session: str) -> str:
        return self._sign(f"csrf:{session}")

    def valid_csrf(self, session: str | None, token: str | None) -> bool:
        if not session or not token or not token.isascii():
            return False
        return hmac.compare_digest(token, self.csrf_token(session))
