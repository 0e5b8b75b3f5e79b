"""Gossipsub through a validator: a message published by one node reaches another."""

from __future__ import annotations

from contextlib import AsyncExitStack

import pytest
import trio
from multiaddr import Multiaddr

from lloom.identity import Identity
from lloom.node.node import NodeConfig, open_node

pytestmark = pytest.mark.timeout(60)


async def test_message_crosses_the_validator() -> None:
    async with AsyncExitStack() as stack:
        validator = await stack.enter_async_context(
            open_node(Identity.generate(), NodeConfig(dht_server=True, pubsub=True))
        )
        boot = [Multiaddr(validator.listen_multiaddrs()[0])]
        a, b = [
            await stack.enter_async_context(
                open_node(Identity.generate(), NodeConfig(bootstrap=boot, pubsub=True))
            )
            for _ in range(2)
        ]
        assert a.pubsub and b.pubsub and validator.pubsub
        await validator.pubsub.subscribe("lloom/test")
        sub = await b.pubsub.subscribe("lloom/test")
        received: list[bytes] = []

        async def receive() -> None:
            msg = await sub.get()
            received.append(msg.data)

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(receive)
                # Meshes form on the heartbeat; publish until the message gets through.
                while not received:
                    await a.pubsub.publish("lloom/test", b"hello")
                    await trio.sleep(0.2)
        assert received == [b"hello"]
