"""TOML files a user writes (config.toml, prices.toml): read with one sentence for each way that fails."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any


def read_toml(path: Path, what: str, error: type[Exception]) -> dict[str, Any]:
    """The document in `path`; `error`, naming `what` and the path, when it is missing, unreadable or not TOML."""
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist.") from None
    except OSError as e:
        raise error(f"{what} {path} cannot be read: {e.strerror}.") from None
    except tomllib.TOMLDecodeError as e:
        raise error(f"{what} {path} is not valid TOML: {e}.") from None
