"""Small SQLite databases of lloom's own (a client's ledger, a gateway's key usage, what a
client observed of executors): private files (0600 in a 0700 folder), WAL, a schema
created if missing."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from lloom.paths import private_file


def open_private_db(path: Path, schema: str) -> sqlite3.Connection:
    """Open (creating it, mode 0600) the database at ``path`` in autocommit mode, usable
    from any thread (callers serialise with their own lock), with ``schema`` applied."""
    db = sqlite3.connect(private_file(path), check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(schema)
    return db
