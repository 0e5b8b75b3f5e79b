"""Kademlia behaviour lloom needs on top of py-libp2p's ``KadDHT``.

Workarounds for py-libp2p 0.8.1, each with a test:

- **Fresh lookups.** ``find_providers`` answers from the local provider cache (kept 48 h)
  and never asks the network again, so new executors stay invisible. :meth:`Dht.find_providers`
  drops the local entry first (unless this node serves the DHT, where the local store *is*
  the authoritative copy) and then asks the network.
- **Dead peers.** Provider records and routing-table entries of peers that went away were
  kept for hours. :class:`PeerJanitor` removes a peer from the routing table and every
  provider record of it as soon as its last connection closes. A killed executor is
  therefore gone from the next lookup once its validators see the TCP connection close
  (immediately for a process that exits or is killed; within the connection's keep-alive
  timeout for a host that vanishes from the network).
- **Client-mode peers in the routing table.** py-libp2p adds every peer that opens a DHT
  stream to its routing table, so a validator handed out clients and executors (DHT
  clients) as "closer peers" and lookups then failed on them with "protocol not supported".
  :class:`ServerOnlyRoutingTable` admits a peer only once identify shows it serves
  ``/ipfs/kad/1.0.0`` (bootstrap validators are admitted directly).
- **Twelve DHT requests at once.** py-libp2p's server resets every DHT stream beyond 12
  at a time, node-wide; validators serve up to :data:`MAX_INBOUND_DHT_STREAMS`.
- **Large provider sets.** A server kept at most 20 providers per key and answered with all
  it held; validators keep up to 10,000 and answer with fair samples
  (:mod:`lloom.node.providers`).
- **Duplicates.** A lookup can return the same provider several times (from several
  validators, or client-mode peers handed out by a validator); providers are merged by
  PeerId, addresses united, order of first appearance kept.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import trio
from libp2p.abc import IHost, INetConn, INetStream, INetwork, INotifee
from libp2p.host.basic_host import BasicHost
from libp2p.kad_dht.common import PROTOCOL_ID as KAD_PROTOCOL_ID
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.kad_dht.routing_table import RoutingTable
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.peer.peerstore import PeerStoreError
from multiaddr import Multiaddr

from lloom.dhtkeys import cid_string
from lloom.errors import DiscoveryFailed
from lloom.node.lookup import ask_providers
from lloom.node.providers import ProviderPolicy

logger = logging.getLogger(__name__)

#: ADD_PROVIDER messages a validator accepts from one peer per 10 s.
PROVIDER_RATE_MAX = 500
#: DHT streams a validator serves at once (py-libp2p: 12 for the whole node).
MAX_INBOUND_DHT_STREAMS = 256


def dedupe_providers(providers: Iterable[PeerInfo], exclude: ID | None = None) -> list[PeerInfo]:
    """Merge providers by PeerId (addresses united, first-seen order kept)."""
    merged: dict[ID, list[Multiaddr]] = {}
    for info in providers:
        if info.peer_id == exclude:
            continue
        addrs = merged.setdefault(info.peer_id, [])
        for addr in info.addrs:
            if addr not in addrs:
                addrs.append(addr)
    return [PeerInfo(pid, addrs) for pid, addrs in merged.items()]


def forget_peer(dht: KadDHT, peer_id: ID) -> int:
    """Remove ``peer_id`` from the routing table and every provider record it holds.

    Returns how many provider records were removed.
    """
    RoutingTable.remove_peer(dht.routing_table, peer_id)  # past any gate in front of it
    store = dht.provider_store
    key_str = str(peer_id)
    removed = 0
    for key in list(store.providers):
        records = store.providers[key]
        if key_str in records:
            del records[key_str]
            removed += 1
            if not records:
                del store.providers[key]
    return removed


class PeerJanitor(INotifee):
    """Network notifee that forgets a peer once its last connection is closed."""

    def __init__(self, dht: KadDHT) -> None:
        self.dht = dht

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        """Forget the peer when no connection to it remains."""
        peer_id = conn.muxed_conn.peer_id
        if network.get_connections(peer_id):
            return
        removed = forget_peer(self.dht, peer_id)
        logger.debug("peer %s disconnected; forgot it (%d provider records)", peer_id, removed)

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        """Not used."""

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        """Not used."""

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        """Not used."""

    async def listen(self, network: INetwork, multiaddr: Multiaddr) -> None:
        """Not used."""

    async def listen_close(self, network: INetwork, multiaddr: Multiaddr) -> None:
        """Not used."""


def _serves_kad(host: IHost, peer_id: ID) -> bool | None:
    """True/False once identify told us the peer's protocols, None before."""
    try:
        protocols = host.get_peerstore().get_protocols(peer_id)
    except PeerStoreError:
        return None
    if not protocols:
        return None
    return str(KAD_PROTOCOL_ID) in protocols


class ServerOnlyRoutingTable:
    """Gate in front of ``RoutingTable.add_peer`` that keeps DHT clients out.

    A peer not yet identified is checked in the background (identify, then add if it
    serves the DHT) so that the DHT request that brought it is not delayed.
    """

    #: How long an unidentified peer may take to answer identify.
    IDENTIFY_TIMEOUT = 5.0

    def __init__(self, host: IHost, table: RoutingTable) -> None:
        self.host = host
        self.table = table
        self.trusted: set[ID] = set()
        self.nursery: trio.Nursery | None = None
        self._pending: set[ID] = set()
        self._add_peer = table.add_peer
        table.add_peer = self.add_peer  # type: ignore[method-assign]
        self._remove_peer = table.remove_peer
        table.remove_peer = self.remove_peer  # type: ignore[method-assign]

    def remove_peer(self, peer_id: ID) -> bool:
        """Remove ``peer_id``, unless it is a bootstrap validator still connected.

        py-libp2p drops a peer from the routing table after one failed stream (a busy
        validator resets streams beyond its limit): a client or executor then had no DHT
        server until its next bootstrap round, 10 s later — lookups failed and
        announcements went unconfirmed. A validator leaves the table when its connection
        closes (:class:`PeerJanitor`).
        """
        if peer_id in self.trusted and self.host.get_network().get_connections(peer_id):
            logger.debug("kept validator %s in the routing table after a failed query", peer_id)
            return False
        return bool(self._remove_peer(peer_id))

    async def add_peer(
        self, peer_obj: PeerInfo | ID, *, skip_server_mode_check: bool = False
    ) -> bool:
        """Add ``peer_obj`` if it is a trusted bootstrap peer or serves the DHT."""
        peer_id = peer_obj.peer_id if isinstance(peer_obj, PeerInfo) else peer_obj
        if peer_id in self.trusted:
            return await self._add_peer(peer_obj, skip_server_mode_check=True)
        serves = _serves_kad(self.host, peer_id)
        if serves is None and self.nursery is not None and peer_id not in self._pending:
            self._pending.add(peer_id)
            self.nursery.start_soon(self._identify_then_add, peer_obj)
        if not serves:
            return False
        return await self._add_peer(peer_obj, skip_server_mode_check=True)

    async def _identify_then_add(self, peer_obj: PeerInfo | ID) -> None:
        peer_id = peer_obj.peer_id if isinstance(peer_obj, PeerInfo) else peer_obj
        try:
            if isinstance(self.host, BasicHost):
                with trio.move_on_after(self.IDENTIFY_TIMEOUT):
                    await self.host._identify_peer(peer_id, reason="lloom-routing-table")
            if _serves_kad(self.host, peer_id):
                await self._add_peer(peer_obj, skip_server_mode_check=True)
            else:
                logger.debug("%s is not a DHT server; kept out of the routing table", peer_id)
        finally:
            self._pending.discard(peer_id)


class Dht:
    """A node's view of the lloom DHT: keys are binary CIDs from :mod:`lloom.dhtkeys`."""

    def __init__(self, host: IHost, *, server: bool) -> None:
        self.host = host
        self.server = server
        self.kad = KadDHT(
            host,
            DHTMode.SERVER if server else DHTMode.CLIENT,
            enable_random_walk=False,
        )
        if server:
            # py-libp2p accepts 10 ADD_PROVIDER per peer per 10 s; an executor announces
            # one key per model, so a validator would refuse executors with many models.
            self.kad._provider_rate_max = PROVIDER_RATE_MAX
            # More than 20 providers per key, handed out as fair samples.
            ProviderPolicy(self.kad.provider_store)
            # py-libp2p serves at most 12 DHT streams at once for the whole node and resets
            # the rest: under load, lookups came back empty ("no executor") and executors'
            # announcements went unconfirmed.
            self.kad._inbound_limiter = trio.CapacityLimiter(MAX_INBOUND_DHT_STREAMS)
        self.gate = ServerOnlyRoutingTable(host, self.kad.routing_table)
        host.get_network().register_notifee(PeerJanitor(self.kad))

    async def add_bootstrap_peer(self, peer_id: ID) -> bool:
        """Add a connected validator to the routing table (it is a DHT server)."""
        self.gate.trusted.add(peer_id)
        return await self.kad.add_peer(peer_id, skip_server_mode_check=True)

    async def provide(self, key: bytes, *, confirm_timeout: float = 5.0) -> bool:
        """Announce that this node provides ``key``.

        ADD_PROVIDER is fire-and-forget (as in Kubo), so the announcement is confirmed by
        asking the DHT servers in the routing table until one lists this node. Returns
        True once confirmed, False if no server has the record within ``confirm_timeout``.
        """
        if not await self.kad.provide(cid_string(key)):
            return False
        mh = key[2:]
        me = self.host.get_id()
        store = self.kad.provider_store
        deadline = trio.current_time() + confirm_timeout
        delay = 0.005
        with trio.move_on_at(deadline):
            while trio.current_time() < deadline:
                for peer in self.kad.routing_table.get_peer_ids():
                    found, _closer = await store._get_providers_from_peer_with_closers(peer, mh)
                    if any(p.peer_id == me for p in found):
                        return True
                await trio.sleep(delay)
                delay = min(delay * 2, 0.25)
        return False

    async def find_providers(
        self, key: bytes, *, count: int = 20, timeout: float = 10.0
    ) -> list[PeerInfo]:
        """Providers of ``key`` found on the network now (never a stale local answer).

        An empty list means the lookup completed and found none; a lookup that could not
        complete (no DHT server connected, or ``timeout`` passed with nothing found) raises
        :class:`DiscoveryFailed` instead.
        """
        text = cid_string(key)
        mh = key[2:]  # the DHT indexes provider records by the CID's multihash
        if not self.server:
            self.kad.provider_store.providers.pop(mh, None)
            if not self.kad.routing_table.get_peer_ids():
                raise DiscoveryFailed("no validator connected to look executors up")
        found: list[PeerInfo] = []
        with trio.move_on_after(timeout) as scope:
            found = await self.kad.find_providers(text, count)
            if not found:
                found = await self._confirm_none(mh)
        if scope.cancelled_caught and not found:
            raise DiscoveryFailed(f"the DHT lookup did not complete within {timeout:g} s")
        return dedupe_providers(found, exclude=self.host.get_id())

    async def _confirm_none(self, multihash: bytes) -> list[PeerInfo]:
        """After an empty lookup, ask every DHT server known directly: their providers, or
        ``[]`` when one of them answered that it has none; :class:`DiscoveryFailed` when
        none answered (py-libp2p's lookup returns ``[]`` then too, see
        :mod:`lloom.node.lookup`)."""
        network = self.host.get_network()
        servers = list(
            set(self.kad.routing_table.get_peer_ids())
            | {p for p in self.gate.trusted if network.get_connections(p)}
        )
        answers: list[list[PeerInfo]] = []

        async def ask(peer: ID) -> None:
            answer = await ask_providers(self.host, peer, multihash)
            if answer is not None:
                answers.append(answer)

        async with trio.open_nursery() as nursery:
            for peer in servers:
                nursery.start_soon(ask, peer)
        if not answers:
            raise DiscoveryFailed(f"no DHT server answered the lookup (asked {len(servers)})")
        return [info for answer in answers for info in answer]

    def forget(self, peer_id: ID) -> int:
        """Forget a peer now (routing table and provider records)."""
        return forget_peer(self.kad, peer_id)
