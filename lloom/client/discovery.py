"""Finding executors for a model and measuring them."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trio
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from lloom.client.observed import ExecutorBook, Seen
from lloom.dhtkeys import model_key
from lloom.errors import DialError, DiscoveryFailed, NetworkError, NoExecutorError
from lloom.node.dht import dedupe_providers
from lloom.node.lanrecord import LanPeer
from lloom.node.node import Node

logger = logging.getLogger(__name__)


#: Seconds a node without validators waits for an executor of the model to show up on the
#: LAN (mDNS finds a running peer in 0.1 to 0.3 s after start).
LAN_WAIT = 2.0


def serves(peer: LanPeer, model: str) -> bool:
    """Whether LAN peer ``peer`` advertises itself as an executor of ``model``."""
    return peer.properties.get("role") == "executor" and model in peer.list_property("models")


async def lan_executors(node: Node, model: str, wait: float = 0.0) -> list[PeerInfo]:
    """Executors of ``model`` that ``node`` found on the LAN by mDNS (none without mDNS),
    waiting up to ``wait`` s for the first one."""
    if node.lan is None:
        return []
    if wait > 0:
        with trio.move_on_after(wait):
            await node.lan.wait_for_peer(lambda p: serves(p, model))
    return [p.info for p in node.lan.lan_peers() if serves(p, model)]


async def find_executors(node: Node, model: str, timeout: float = 10.0) -> list[PeerInfo]:
    """Executors of ``model``: providers of its DHT key, then those on the LAN (mDNS).

    Raises :class:`NoExecutorError` when neither knows one, :class:`DiscoveryFailed` when
    the DHT lookup itself failed and the LAN has none either.
    """
    if not node.config.bootstrap:
        found = await lan_executors(node, model, wait=LAN_WAIT)
        if not found:
            raise NoExecutorError(f"no executor on the LAN serves model {model!r}")
        return found
    try:
        found = await node.dht.find_providers(model_key(model), timeout=timeout)
    except DiscoveryFailed:
        found = []
        if not await lan_executors(node, model):
            raise
    found = dedupe_providers([*found, *await lan_executors(node, model)])
    if not found:
        raise NoExecutorError(f"no executor serves model {model!r}")
    return found


async def measure(
    node: Node,
    candidates: list[PeerInfo],
    timeout: float = 2.0,
    failures: dict[ID, str] | None = None,
) -> dict[ID, float]:
    """Dial and ping every candidate concurrently; RTT in ms of those that answered (why
    the others did not goes into ``failures`` when given)."""
    rtts: dict[ID, float] = {}
    why = failures if failures is not None else {}

    async def one(info: PeerInfo) -> None:
        try:
            with trio.fail_after(timeout):
                await node.connect(info, timeout=timeout)
                rtts[info.peer_id] = await node.ping(info.peer_id, timeout=timeout) * 1000
        except trio.TooSlowError:
            why[info.peer_id] = f"no answer within {timeout:g} s"
            logger.info("executor %s did not answer within %g s", info.peer_id, timeout)
        except (DialError, NetworkError, OSError) as exc:
            why[info.peer_id] = str(exc)
            logger.info("executor %s unreachable: %s", info.peer_id, exc)
        except Exception as exc:  # ping failures surface as assorted py-libp2p errors
            why[info.peer_id] = f"no ping answer: {exc}"
            logger.info("executor %s did not answer a ping: %s", info.peer_id, exc)

    async with trio.open_nursery() as nursery:
        for info in candidates:
            nursery.start_soon(one, info)
    return rtts


@dataclass(frozen=True, slots=True)
class Choice:
    """Which executors a client may use: only ``allow`` (if given), never ``deny``
    (PeerIds as text), ranked with what its ``book`` observed."""

    allow: frozenset[str] = frozenset()
    deny: frozenset[str] = frozenset()
    book: ExecutorBook | None = None

    def permitted(self, found: list[PeerInfo]) -> list[PeerInfo]:
        """``found`` without denied executors (and only allowed ones, with an allow-list)."""
        return [
            info
            for info in found
            if str(info.peer_id) not in self.deny
            and (not self.allow or str(info.peer_id) in self.allow)
        ]

    def seen(self, peers: list[ID]) -> dict[ID, Seen]:
        """What the book observed of ``peers``."""
        if self.book is None:
            return {}
        return {p: s for p in peers if (s := self.book.get(str(p))) is not None}
