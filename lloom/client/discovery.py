"""Finding executors for a model and measuring them."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import trio
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from lloom.client.ranking import rank
from lloom.dhtkeys import model_key
from lloom.errors import DialError, NetworkError, NoExecutorError
from lloom.node.node import Node
from lloom.protocol.announce import LoadAnnouncement

logger = logging.getLogger(__name__)


async def find_executors(node: Node, model: str, timeout: float = 10.0) -> list[PeerInfo]:
    """Executors providing ``model``'s DHT key; raises :class:`NoExecutorError` if none."""
    found = await node.dht.find_providers(model_key(model), timeout=timeout)
    if not found:
        raise NoExecutorError(f"no executor serves model {model!r}")
    return found


async def measure(node: Node, candidates: list[PeerInfo], timeout: float = 2.0) -> dict[ID, float]:
    """Dial and ping every candidate concurrently; RTT in ms of those that answered."""
    rtts: dict[ID, float] = {}

    async def one(info: PeerInfo) -> None:
        try:
            with trio.fail_after(timeout):
                await node.connect(info, timeout=timeout)
                rtts[info.peer_id] = await node.ping(info.peer_id, timeout=timeout) * 1000
        except (DialError, NetworkError, trio.TooSlowError, OSError) as exc:
            logger.info("executor %s unreachable: %s", info.peer_id, exc)
        except Exception as exc:  # ping failures surface as assorted py-libp2p errors
            logger.info("executor %s did not answer a ping: %s", info.peer_id, exc)

    async with trio.open_nursery() as nursery:
        for info in candidates:
            nursery.start_soon(one, info)
    return rtts


async def ordered_executors(
    node: Node,
    model: str,
    loads: Mapping[ID, LoadAnnouncement] | None = None,
    *,
    timeout: float = 10.0,
) -> list[PeerInfo]:
    """Executors for ``model``, best first: measured latency and announced load."""
    found = await find_executors(node, model, timeout)
    by_id = {info.peer_id: info for info in found}
    rtts = await measure(node, found) if len(found) > 1 else {}
    order = rank(list(by_id), rtts, loads or {})
    return [by_id[pid] for pid in order]
