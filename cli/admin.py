"""`admin rotate`: a new admin key, shown once; every UI session ends."""

from __future__ import annotations

import argparse
import sys

from config import Settings
from storage import audit, secrets, sessions


def command(args: argparse.Namespace, settings: Settings) -> int:
    """`admin rotate`: the old key stops working at once, in the UI and (within seconds) in mitmweb."""
    try:
        key = secrets.rotate_admin_key(settings.storage_path)
    except ValueError as e:
        print(f"keyrotor: {e}", file=sys.stderr)
        return 1
    ended = sessions.end_all(settings.storage_path)
    audit.log_now(settings.storage_path, "admin.rotate", None, {"sessions_ended": ended})
    print(
        f"admin key replaced; {ended} UI session(s) ended. The new admin key (shown only now):\n{key}",
        flush=True,
    )
    return 0
