"""``/v1/models`` lists what gossip announces only once the DHT has a provider for it."""

from __future__ import annotations

from typing import Any, cast

from libp2p.peer.peerinfo import PeerInfo

from lloom.client.network import Listing, NetworkClient
from lloom.errors import NoExecutorError
from lloom.identity import Identity
from lloom.node.node import Node
from lloom.protocol.announce import LoadAnnouncement


async def test_a_model_only_gossip_claims_is_not_listed() -> None:
    class Unconnected:
        lan = None

        def path_to(self, _peer: object) -> None:
            return None

    gateway = NetworkClient(cast(Node, Unconnected()), None)
    honest, liar = Identity.generate().peer_id, Identity.generate().peer_id
    gateway.loads.update(honest, LoadAnnouncement(("real",), 0, 16, 0.0))
    gateway.loads.update(liar, LoadAnnouncement(("real", "made-up"), 0, 16, 0.0))
    looked_up: list[str] = []

    async def executors(model: str) -> list[PeerInfo]:
        looked_up.append(model)
        if model == "made-up":
            raise NoExecutorError("no provider in the DHT")
        return [PeerInfo(honest, [])]

    cast(Any, gateway).executors = executors
    assert await gateway.models() == {"real": Listing(1, 0)}
    assert sorted(looked_up) == ["made-up", "real"]
    assert await gateway.models(limit=1) == {"real": Listing(1, 0)}  # the most announced first
