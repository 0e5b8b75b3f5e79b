"""The gateway's discovery: the last executors found are kept, one lookup per model at a
time, and "no executor" (404) only when the DHT itself found none (issue 10, item 3)."""

from __future__ import annotations

from typing import Any, cast

import pytest
import trio
import trio.testing
from libp2p.peer.peerinfo import PeerInfo

import lloom.client.network as core
from lloom.client.network import NetworkClient
from lloom.errors import DiscoveryFailed, NoExecutorError
from lloom.identity import Identity
from lloom.node.node import Node

PEER = PeerInfo(Identity.generate().peer_id, [])


class Lookups:
    """A fake DHT: counts lookups; each answers what ``answer`` says, after a while."""

    def __init__(self) -> None:
        self.count = 0
        self.answer: list[PeerInfo] | Exception = [PEER]

    async def __call__(self, node: Node, model: str, timeout: float = 10.0) -> list[PeerInfo]:
        self.count += 1
        await trio.sleep(0.05)
        if isinstance(self.answer, Exception):
            raise self.answer
        return list(self.answer)


async def reachable(
    node: Node, found: list[PeerInfo], timeout: float = 2.0, failures: Any = None
) -> dict[Any, float]:
    """A fake measurement: every executor answered in 1 ms."""
    return {info.peer_id: 1.0 for info in found}


class Unconnected:
    """A node that is connected to nobody."""

    lan = None

    def path_to(self, _peer: object) -> None:
        return None


@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch) -> Lookups:
    fake = Lookups()
    monkeypatch.setattr(core, "find_executors", fake)
    monkeypatch.setattr(core, "measure", reachable)
    return fake


def gateway(nursery: trio.Nursery) -> NetworkClient:
    g = NetworkClient(cast(Node, Unconnected()), None, discovery_ttl=10.0)
    g.nursery = nursery
    return g


async def test_concurrent_requests_share_one_lookup(lookups: Lookups) -> None:
    async with trio.open_nursery() as nursery:
        g = gateway(nursery)
        answers: list[Any] = []

        async def ask() -> None:
            answers.append(await g.executors("m"))

        for _ in range(64):
            nursery.start_soon(ask)
    assert lookups.count == 1 and len(answers) == 64


async def test_a_failed_lookup_is_a_503_never_a_404_and_keeps_what_was_known(
    lookups: Lookups, autojump_clock: trio.testing.MockClock
) -> None:
    async with trio.open_nursery() as nursery:
        g = gateway(nursery)
        lookups.answer = DiscoveryFailed("timed out")
        with pytest.raises(DiscoveryFailed):
            await g.executors("m")
        lookups.answer = [PEER]
        assert await g.executors("m") == [PEER]
        # Later the lookups time out (under load): the known executor is still used.
        lookups.answer = DiscoveryFailed("timed out")
        await trio.sleep(11)  # older than discovery_ttl
        assert await g.executors("m") == [PEER]
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(1)
        assert await g.executors("m") == [PEER]
        g.forget("m")  # every executor failed: still known, refreshed in the background
        assert await g.executors("m") == [PEER]
        # Only the DHT saying "nobody" (the refresh now running) removes it: then 404.
        lookups.answer = []
        await trio.sleep(1)
        with pytest.raises(NoExecutorError):
            await g.executors("m")
        nursery.cancel_scope.cancel()


async def test_an_executor_that_refused_as_busy_is_not_drawn_for_a_second() -> None:
    peers = [PeerInfo(Identity.generate().peer_id, []) for _ in range(3)]
    g = NetworkClient(cast(Node, Unconnected()), None)
    busy = peers[0].peer_id
    g._note_busy(busy)
    firsts = {g._spread(peers)[0].peer_id for _ in range(200)}
    assert busy not in firsts and firsts
    await trio.sleep(core.BUSY_SECS + 0.05)
    assert busy in {g._spread(peers)[0].peer_id for _ in range(200)}


async def test_an_unreachable_executor_is_not_drawn_for_half_a_minute(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A cut cable stalled one request after another (10 s each) while the gateway kept
    drawing the executor at even odds until its next lookup dropped it."""
    peers = [PeerInfo(Identity.generate().peer_id, []) for _ in range(2)]
    g = NetworkClient(cast(Node, Unconnected()), None)
    dead = peers[0].peer_id
    g._note_unreachable(dead)
    g._note_busy(dead)  # a shorter bench never shortens a longer one
    await trio.sleep(core.UNREACHABLE_SECS - 1)
    assert dead not in {g._spread(peers)[0].peer_id for _ in range(200)}
    await trio.sleep(2)
    assert dead in {g._spread(peers)[0].peer_id for _ in range(200)}
