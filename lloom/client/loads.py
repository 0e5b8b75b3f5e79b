"""Executors' announced load, followed on gossipsub by long-running clients (the gateway).

A short-lived CLI ranks executors by measured latency alone: announcements come every few
seconds and it would have to wait for them. The sender of an announcement is the
gossipsub message's signed source, never a field of the payload.
"""

from __future__ import annotations

import logging
import time

import trio
from libp2p.peer.id import ID

from lloom.errors import ProtocolError
from lloom.node.node import Node
from lloom.protocol.announce import TOPIC, LoadAnnouncement

logger = logging.getLogger(__name__)


class LoadTable:
    """The latest announcement of each executor, forgotten after ``max_age`` seconds."""

    def __init__(self, max_age: float = 30.0) -> None:
        self.max_age = max_age
        self._latest: dict[ID, tuple[float, LoadAnnouncement]] = {}
        self._changed = trio.Event()

    def update(self, peer_id: ID, announcement: LoadAnnouncement, now: float | None = None) -> None:
        """Record ``announcement`` from ``peer_id`` (received at ``now``)."""
        self._latest[peer_id] = (time.monotonic() if now is None else now, announcement)
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, peer_id: ID) -> LoadAnnouncement:
        """Wait until an announcement of ``peer_id`` is known; return it."""
        while (found := self.current().get(peer_id)) is None:
            await self._changed.wait()
        return found

    def current(self, now: float | None = None) -> dict[ID, LoadAnnouncement]:
        """Announcements younger than ``max_age``."""
        at = time.monotonic() if now is None else now
        fresh = {p: a for p, (t, a) in self._latest.items() if at - t <= self.max_age}
        self._latest = {p: v for p, v in self._latest.items() if p in fresh}
        return fresh

    def models(self, now: float | None = None) -> dict[str, int]:
        """How many announcing executors serve each model."""
        counts: dict[str, int] = {}
        for announcement in self.current(now).values():
            for model in announcement.models:
                counts[model] = counts.get(model, 0) + 1
        return counts


async def follow_loads(node: Node, table: LoadTable) -> None:
    """Subscribe to the announcement topic and keep ``table`` up to date (until cancelled)."""
    if node.pubsub is None:
        raise RuntimeError("follow_loads needs a node started with pubsub=True")
    subscription = await node.pubsub.subscribe(TOPIC)
    while True:
        message = await subscription.get()
        try:
            sender = ID(message.from_id)
            table.update(sender, LoadAnnouncement.decode(message.data))
        except (ProtocolError, ValueError) as exc:
            logger.debug("ignored a malformed load announcement: %s", exc)
