"""Where lloom keeps its files."""

from __future__ import annotations

import os
from pathlib import Path

#: Environment variable that overrides the data directory.
ENV_DATA_DIR = "LLOOM_DATA_DIR"


def default_data_dir() -> Path:
    """``$LLOOM_DATA_DIR``, else ``$XDG_DATA_HOME/lloom``, else ``~/.local/share/lloom``."""
    if explicit := os.environ.get(ENV_DATA_DIR):
        return Path(explicit)
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "lloom"


def default_key_file(role: str) -> Path:
    """The key file a role creates and reuses when no key is given."""
    return default_data_dir() / f"{role}.key"
