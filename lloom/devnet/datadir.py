"""The devnet's data dir on disk: its lock, and the keys of its roles."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

from lloom.devnet.layout import KEY_ROLES, Layout
from lloom.errors import DevnetError
from lloom.identity import Identity
from lloom.paths import private_dir


@contextmanager
def locked(layout: Layout) -> Iterator[None]:
    """Hold the data dir's lock; a second devnet on the same dir gets a clear error."""
    private_dir(layout.root)
    handle: IO[str] = layout.lock.open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        raise DevnetError(
            f"another lloom devnet (pid {holder}) is using {layout.root}; stop it first"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    try:
        yield
    finally:
        handle.close()


def ensure_keys(layout: Layout) -> dict[str, Identity]:
    """Every role's identity; created (mode 0600, folder 0700) on the first run, then reused."""
    private_dir(layout.key("any").parent)
    keys = {}
    for role in KEY_ROLES:
        path = layout.key(role)
        if not path.exists():
            Identity.generate().write_key_file(path)
        keys[role] = Identity.from_key_file(path)
    return keys
