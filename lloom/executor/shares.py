"""Each peer's share of an executor: requests running, streams open, one end per channel.

Counters that exist only while in use (a stranger's PeerId is never kept after its last
stream closes), and per-channel locks that serialise the end of requests of one client and
model, so that receipts ask for running totals in order.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Generic, TypeVar

import trio

from lloom.errors import ErrorCode, Refused

K = TypeVar("K")


class Counter(Generic[K]):
    """How many of something each key holds; a key is forgotten at zero."""

    def __init__(self, limit: int, what: str) -> None:
        self.limit = limit
        self.what = what
        self._held: dict[K, int] = {}

    def held(self, key: K) -> int:
        """How many ``key`` holds now."""
        return self._held.get(key, 0)

    def __len__(self) -> int:
        return len(self._held)

    @contextmanager
    def hold(self, key: K) -> Iterator[None]:
        """Hold one for ``key``; raises :class:`Refused` (``busy``) at the limit."""
        held = self.held(key)
        if held >= self.limit:
            raise Refused(ErrorCode.BUSY, f"too many {self.what} from you ({self.limit} at most)")
        self._held[key] = held + 1
        try:
            yield
        finally:
            left = self._held[key] - 1
            if left:
                self._held[key] = left
            else:
                del self._held[key]


class Channels(Generic[K]):
    """One lock per channel, kept only while a request of the channel uses it."""

    def __init__(self) -> None:
        self._locks: dict[K, tuple[trio.Lock, int]] = {}

    def __len__(self) -> int:
        return len(self._locks)

    @asynccontextmanager
    async def one_at_a_time(self, key: K) -> AsyncIterator[None]:
        """Hold ``key``'s lock."""
        lock, users = self._locks.get(key, (trio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users > 1:
                self._locks[key] = (lock, users - 1)
            else:
                del self._locks[key]
