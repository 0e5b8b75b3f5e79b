"""A node's shutdown: its connections are closed at once, and its peers see them go."""

from __future__ import annotations

import time

import pytest
import trio

from lloom.node.node import close_connections
from tests.node.conftest import network

pytestmark = pytest.mark.timeout(60)


async def test_connections_are_closed_at_once() -> None:
    async with network(4) as (validator, clients):
        network_ = validator.host.get_network()
        assert len(network_.get_connections()) == 4
        start = time.perf_counter()
        await close_connections(validator.host)
        elapsed = time.perf_counter() - start
        assert network_.get_connections() == []
        # py-libp2p's host.close closes one after another, each 0.2 s: 0.8 s for four.
        assert elapsed < 0.5, f"closing four connections took {elapsed * 1000:.0f} ms"

        def seen_by_a_client() -> bool:
            return any(c.host.get_network().get_connections(validator.peer_id) for c in clients)

        with trio.fail_after(5):
            while seen_by_a_client():  # noqa: ASYNC110 - py-libp2p's state, no event
                await trio.sleep(0.01)
