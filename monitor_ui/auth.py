"""Admin sessions: a signed cookie naming a session the server holds, and CSRF tokens bound to it.

The signature refuses forged and tampered cookies without a lookup; the server-side record
(storage/sessions.py) is what logging out and `run.py admin rotate` remove.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets as random
import time
from pathlib import Path

from storage import secrets, sessions

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
        now = now or time.time()
        expires = int(now + SESSION_SECONDS)
        nonce = random.token_urlsafe(16)  # two logins in the same second are two sessions
        token = f"{expires}.{nonce}.{self._sign(f'session:{expires}:{nonce}')}"
        sessions.add(self._db_path, token, expires, now)
        return token

    def valid_session(self, token: str | None, now: float | None = None) -> bool:
        # The cookie is attacker-controlled: anything odd is simply not a session.
        if not token or len(token) > 200 or not token.isascii() or token.count(".") != 2:
            return False
        expires, nonce, signature = token.split(".")
        now = now or time.time()
        if not expires.isdecimal() or int(expires) < now:
            return False
        if not hmac.compare_digest(signature, self._sign(f"session:{expires}:{nonce}")):
            return False
        return sessions.is_live(self._db_path, token, now)

    def end_session(self, token: str | None) -> None:
        if token and self.valid_session(token):
            sessions.end(self._db_path, token)

    def csrf_token(self, session: str) -> str:
        return self._sign(f"csrf:{session}")

    def valid_csrf(self, session: str | None, token: str | None) -> bool:
        if not session or not token or not token.isascii():
            return False
        return hmac.compare_digest(token, self.csrf_token(session))
