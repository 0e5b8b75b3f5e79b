"""The gateway's connection to the network: warm streams, discovery cache, load table.

One :class:`Gateway` serves every HTTP request: it keeps libp2p connections and idle request
streams to executors (:class:`~lloom.client.session.StreamPool`), follows executors' load
announcements, caches per-model discovery for a few seconds, fails over like the CLI and
signs receipts automatically.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from libp2p.peer.peerinfo import PeerInfo

from lloom.client.discovery import find_executors, measure
from lloom.client.loads import LoadTable
from lloom.client.ranking import rank
from lloom.client.receipts import ReceiptSigner
from lloom.client.session import Result, StreamPool, request_with_failover
from lloom.node.node import Node
from lloom.protocol import llm

ChunkCallback = Callable[[dict[str, Any]], Awaitable[None]]


class Gateway:
    """Network side of the gateway."""

    def __init__(
        self,
        node: Node,
        signer: ReceiptSigner | None,
        *,
        discovery_ttl: float = 10.0,
        timeout: float = 300.0,
    ) -> None:
        self.node = node
        self.signer = signer
        self.discovery_ttl = discovery_ttl
        self.timeout = timeout
        self.pool = StreamPool(node, max_idle_per_peer=64)
        self.loads = LoadTable()
        self._found: dict[str, tuple[float, list[PeerInfo], dict[Any, float]]] = {}
        #: Where streamed requests run (set by whoever serves the gateway).
        self.nursery: trio.Nursery | None = None

    async def executors(self, model: str) -> list[PeerInfo]:
        """Executors for ``model``, best first (cached for ``discovery_ttl`` seconds)."""
        now = time.monotonic()
        cached = self._found.get(model)
        if cached is None or now - cached[0] > self.discovery_ttl:
            found = await find_executors(self.node, model)
            rtts = await measure(self.node, found) if len(found) > 1 else {}
            cached = (now, found, rtts)
            self._found[model] = cached
        _, found, rtts = cached
        by_id = {info.peer_id: info for info in found}
        return [by_id[p] for p in rank(list(by_id), rtts, self.loads.current())]

    def forget(self, model: str) -> None:
        """Drop the cached executors of ``model`` (after they all failed)."""
        self._found.pop(model, None)

    async def run(self, request: llm.Request, on_chunk: ChunkCallback | None = None) -> Result:
        """Run ``request`` with failover; raises the client errors of :mod:`lloom.errors`."""
        candidates = await self.executors(request.model)
        try:
            return await request_with_failover(
                self.node,
                candidates,
                request,
                on_chunk,
                total_timeout=self.timeout,
                pool=self.pool,
                signer=self.signer,
            )
        except Exception:
            self.forget(request.model)
            raise

    def models(self) -> dict[str, int]:
        """Models announced on the network, with how many executors serve each."""
        return self.loads.models()
