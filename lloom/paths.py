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


def private_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents) readable only by this user (0700).

    An existing directory is tightened to 0700 when it is ours; data dirs hold usage
    databases, ledgers and keys.
    """
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for folder in reversed(missing):
        folder.mkdir(mode=0o700, exist_ok=True)
    if path.stat().st_uid == os.getuid() and path.stat().st_mode & 0o077:
        path.chmod(0o700)
    return path


def private_file(path: Path) -> Path:
    """Make sure ``path`` exists and is readable only by this user (0600), its folder 0700.

    Called before SQLite opens a database: SQLite gives its -wal and -shm files the mode
    of the database file.
    """
    private_dir(path.parent)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if os.fstat(fd).st_uid == os.getuid():
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    return path


def exposed_to_others(path: Path) -> str | None:
    """A message saying how to fix ``path`` if other users may read or write it, else None.

    As ssh refuses an unprotected private key, lloom refuses a key file or a config holding
    a key that group or others can read.
    """
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    if os.name != "posix" or not mode & 0o077:
        return None
    return (
        f"{path} is accessible by other users (mode {mode & 0o777:04o}) and holds a secret; "
        f"fix it with: chmod 600 {path}"
    )
