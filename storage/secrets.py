"""Secrets kept beside the database: the Fernet key for upstream keys and the admin key's hash.

Files are created with mode 0600 on first use. KEYROTOR_SECRET and KEYROTOR_ADMIN_KEY
supply the values instead, for deployments that keep secrets out of the data directory.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path

import argon2
from cryptography.fernet import Fernet, InvalidToken

from core.credentials import hash_client_key  # noqa: F401 (storage hashes client keys as the proxy does)
from core.passes import derive_key

CLIENT_KEY_PREFIX = "kr-"
# The admin key is the UI's and mitmweb's only credential: generated ones have 47 characters.
MIN_ADMIN_KEY_LENGTH = 24


def _sidecar(db_path: str | Path, suffix: str) -> Path:
    return Path(f"{db_path}.{suffix}")


def _write_private(path: Path, content: str) -> None:
    # O_EXCL: two processes starting at once must not each write a different secret.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(content)


def secret_bytes(db_path: str | Path) -> bytes:
    """The installation's secret (KEYROTOR_SECRET or the .secret file), created on first use."""
    from_env = os.environ.get("KEYROTOR_SECRET")
    if from_env:
        return from_env.encode()
    path = _sidecar(db_path, "secret")
    if not path.exists():
        try:
            _write_private(path, Fernet.generate_key().decode())
        except FileExistsError:
            pass
    return path.read_text().strip().encode()


class KeyCipher:
    """Encrypts upstream key values and fingerprints them (keyed hash, to spot duplicates)."""

    def __init__(self, secret: bytes) -> None:
        try:
            self._fernet = Fernet(secret)
        except ValueError:
            raise ValueError(
                "KEYROTOR_SECRET (or the .secret file beside the database) is not a valid Fernet key;"
                " make one with: python -c 'from cryptography.fernet import Fernet;"
                " print(Fernet.generate_key().decode())'"
            ) from None
        # A key of its own for fingerprints, derived so one secret never serves two primitives.
        self._hmac_key = hashlib.sha256(b"keyrotor-fingerprint\0" + secret).digest()

    def encrypt(self, value: str) -> bytes:
        return self._fernet.encrypt(value.encode())

    def decrypt(self, token: bytes) -> str | None:
        """The key value, or None when the secret has changed since it was encrypted."""
        try:
            return self._fernet.decrypt(token).decode()
        except InvalidToken:
            return None

    def fingerprint(self, value: str) -> str:
        return hmac.new(self._hmac_key, value.encode(), hashlib.sha256).hexdigest()


def key_cipher(db_path: str | Path) -> KeyCipher:
    return KeyCipher(secret_bytes(db_path))


def pass_key(db_path: str | Path) -> bytes:
    """The key that signs passes (core/passes.py), derived from the installation's secret: the UI mints
    them, the proxy verifies them."""
    return derive_key(secret_bytes(db_path))


def new_client_key() -> str:
    return CLIENT_KEY_PREFIX + secrets.token_urlsafe(32)


def ensure_admin_key(db_path: str | Path) -> str | None:
    """Create the admin key on first use. Returns it when newly generated (show it once), else None.

    Raises ValueError when KEYROTOR_ADMIN_KEY is too short to be the only lock on the UI and mitmweb.
    """
    from_env = os.environ.get("KEYROTOR_ADMIN_KEY")
    if from_env:
        if len(from_env.strip()) < MIN_ADMIN_KEY_LENGTH:
            raise ValueError(
                f"KEYROTOR_ADMIN_KEY must be at least {MIN_ADMIN_KEY_LENGTH} characters long; make one with:"
                " python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
            )
        return None
    path = _sidecar(db_path, "admin")
    if path.exists():
        return None
    key = new_admin_key()
    try:
        _write_private(path, json.dumps(_admin_hashes(key)))
    except FileExistsError:
        return None
    return key


def new_admin_key() -> str:
    return "kra-" + secrets.token_urlsafe(32)


def rotate_admin_key(db_path: str | Path) -> str:
    """Replace the stored admin key with a new one and return it (show it once).

    The file is replaced whole (written beside it, then renamed), so a process reading it
    sees the old key or the new one, never a mix.
    """
    if os.environ.get("KEYROTOR_ADMIN_KEY"):
        raise ValueError("the admin key comes from KEYROTOR_ADMIN_KEY: set a new value there and restart keyrotor.")
    key = new_admin_key()
    path = _sidecar(db_path, "admin")
    staged = path.with_name(path.name + ".new")
    staged.unlink(missing_ok=True)
    _write_private(staged, json.dumps(_admin_hashes(key)))
    os.replace(staged, path)
    return key


def _admin_hashes(key: str) -> dict[str, str]:
    # sha256 for the UI (the key is random, so a fast digest is safe); argon2 because
    # that is the hash mitmweb's web_password accepts.
    return {
        "sha256": hashlib.sha256(key.encode()).hexdigest(),
        "argon2": argon2.PasswordHasher().hash(key),
    }


def _admin_record(db_path: str | Path) -> dict[str, str]:
    from_env = os.environ.get("KEYROTOR_ADMIN_KEY")
    if from_env:
        return _admin_hashes(from_env)
    return json.loads(_sidecar(db_path, "admin").read_text())


def admin_key_version(db_path: str | Path) -> tuple[int, int, int] | None:
    """Changes whenever the stored admin key is replaced; None when it comes from KEYROTOR_ADMIN_KEY."""
    if os.environ.get("KEYROTOR_ADMIN_KEY"):
        return None
    try:
        stat = _sidecar(db_path, "admin").stat()
    except FileNotFoundError:
        return None
    return (stat.st_ino, stat.st_mtime_ns, stat.st_size)


def admin_key_hash(db_path: str | Path) -> str:
    from_env = os.environ.get("KEYROTOR_ADMIN_KEY")
    if from_env:
        return hashlib.sha256(from_env.encode()).hexdigest()
    return _admin_record(db_path)["sha256"]


def mitmweb_password(db_path: str | Path) -> str:
    """An argon2 hash of the admin key, so mitmweb asks for the same credential as the UI."""
    return _admin_record(db_path)["argon2"]


def is_admin_key(db_path: str | Path, candidate: str) -> bool:
    digest = hashlib.sha256(candidate.encode()).hexdigest()
    return hmac.compare_digest(digest, admin_key_hash(db_path))
