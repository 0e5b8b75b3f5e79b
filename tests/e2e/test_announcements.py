"""An executor process announces its models and load on gossipsub; a client follows them."""

from __future__ import annotations

import pytest
import trio
from libp2p.peer.id import ID
from multiaddr import Multiaddr

from lloom.client.loads import LoadTable, follow_loads
from lloom.identity import Identity
from lloom.node.node import NodeConfig, open_node
from tests.support.network import start_executor, start_mock, start_validator
from tests.support.procs import Processes

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]


async def test_client_learns_models_and_load(procs: Processes) -> None:
    _, url = start_mock(procs)
    _, v = start_validator(procs)
    _, ex, _ = start_executor(procs, "exec", v.listen[0], url, ["mock-a", "mock-b"])
    table = LoadTable()
    config = NodeConfig(bootstrap=[Multiaddr(v.listen[0])], pubsub=True)
    async with open_node(Identity.generate(), config) as node, trio.open_nursery() as nursery:
        nursery.start_soon(follow_loads, node, table)
        with trio.fail_after(45):
            announcement = await table.wait_for(ID.from_base58(ex.peer_id))
        assert announcement.models == ("mock-a", "mock-b")
        assert announcement.active == 0 and announcement.max == 16
        assert table.models() == {"mock-a": 1, "mock-b": 1}
        nursery.cancel_scope.cancel()
