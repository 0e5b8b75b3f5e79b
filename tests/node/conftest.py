"""In-process nodes for node-layer tests (one trio run, several hosts on 127.0.0.1)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from multiaddr import Multiaddr

from lloom.identity import Identity
from lloom.node.node import Node, NodeConfig, open_node


@asynccontextmanager
async def network(clients: int) -> AsyncIterator[tuple[Node, list[Node]]]:
    """A validator (DHT server) and ``clients`` client-mode nodes bootstrapped to it."""
    async with AsyncExitStack() as stack:
        validator = await stack.enter_async_context(
            open_node(Identity.generate(), NodeConfig(dht_server=True))
        )
        boot = [Multiaddr(validator.listen_multiaddrs()[0])]
        nodes = [
            await stack.enter_async_context(
                open_node(Identity.generate(), NodeConfig(bootstrap=boot))
            )
            for _ in range(clients)
        ]
        yield validator, nodes
