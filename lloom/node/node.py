"""A running lloom node: host, DHT, optional gossipsub, bootstrap maintenance.

Use :func:`open_node` as an async context manager; every role builds on it::

    async with open_node(identity, NodeConfig(listen=[...], bootstrap=[...])) as node:
        print(node.listen_multiaddrs())
        providers = await node.dht.find_providers(executor_role_key())
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

import trio
from libp2p.abc import IHost, INetConn
from libp2p.host.ping import PingService
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.tools.anyio_service import background_trio_service
from multiaddr import Multiaddr

from lloom.errors import DialError, NetworkError, UsageError
from lloom.identity import Identity
from lloom.node.dht import Dht
from lloom.node.host import build_host, expand_addrs
from lloom.node.mdns import LanDiscovery
from lloom.node.patches import apply_all
from lloom.node.reach import Reachability, Reservations, check_reachability, serve_autonat
from lloom.node.relay import HopService, RelayDialer, RelaySettings, advertise, is_circuit

logger = logging.getLogger(__name__)

DEFAULT_LISTEN = "/ip4/127.0.0.1/tcp/0"
#: How long DCUtR tries one direct dial (py-libp2p's 10 s default delayed every punch).
HOLE_PUNCH_DIAL_SECS = 2


def parse_multiaddr(text: str, *, need_peer_id: bool = False) -> Multiaddr:
    """Parse a multiaddr, raising :class:`UsageError` with the offending text."""
    try:
        addr = Multiaddr(text.strip())
    except Exception as exc:  # multiaddr raises several unrelated types
        raise UsageError(f"invalid multiaddr {text!r}: {exc}") from None
    if need_peer_id and "/p2p/" not in str(addr):
        raise UsageError(f"multiaddr {text!r} must end in /p2p/<PeerId>")
    return addr


def parse_multiaddr_list(
    text: str | Sequence[str], *, need_peer_id: bool = False
) -> list[Multiaddr]:
    """Parse a comma-separated list (or a list of such strings) of multiaddrs."""
    items = [text] if isinstance(text, str) else list(text)
    out: list[Multiaddr] = []
    for item in items:
        for part in item.split(","):
            if part.strip():
                out.append(parse_multiaddr(part, need_peer_id=need_peer_id))
    return out


@dataclass
class NodeConfig:
    """How a node joins the network."""

    listen: list[Multiaddr] = field(default_factory=lambda: [Multiaddr(DEFAULT_LISTEN)])
    bootstrap: list[Multiaddr] = field(default_factory=list)
    announce: list[Multiaddr] = field(default_factory=list)
    dht_server: bool = False
    pubsub: bool = False
    #: How often lost bootstrap connections are re-dialled.
    bootstrap_interval: float = 10.0
    dial_timeout: float = 10.0
    #: "auto" asks the validators (AutoNAT dial-back); "public" or "private" says so.
    reachability: str = "auto"
    #: A validator's relay service (None: it relays nothing).
    relay: RelaySettings | None = None
    #: Relay reservations a private node keeps.
    reservations: int = 2
    #: Try DCUtR hole punching to turn relayed connections into direct ones.
    hole_punch: bool = True
    #: Find peers on the LAN with mDNS, advertising ``lan_properties`` (e.g. models).
    mdns: bool = False
    lan_properties: dict[str, str] = field(default_factory=lambda: {"role": "client"})

    def __post_init__(self) -> None:
        if self.reachability not in ("auto", "public", "private"):
            raise UsageError(
                f"reachability must be auto, public or private, not {self.reachability!r}"
            )


class Node:
    """A started node. Create it with :func:`open_node`."""

    def __init__(self, identity: Identity, config: NodeConfig, host: IHost) -> None:
        self.identity = identity
        self.config = config
        self.host = host
        self.dht = Dht(host, server=config.dht_server)
        self.pubsub: Pubsub | None = None
        self._bootstrap_infos = [info_from_p2p_addr(a) for a in config.bootstrap]
        self.relay_protocol: CircuitV2Protocol = (
            HopService(host, config.relay) if config.relay else CircuitV2Protocol(host)
        )
        self.relay_dialer = RelayDialer(host, self.relay_protocol)
        self.reservations: Reservations | None = None
        #: mDNS discovery on the LAN (``config.mdns``).
        self.lan: LanDiscovery | None = (
            LanDiscovery(host, properties=config.lan_properties) if config.mdns else None
        )
        #: "direct" or "relayed" once :meth:`make_reachable` ran.
        self.path: str | None = None
        #: Set whenever the advertised addresses change (re-announce then).
        self.addrs_changed = trio.Event()

    @property
    def peer_id(self) -> ID:
        """This node's PeerId."""
        return self.host.get_id()

    def listen_multiaddrs(self) -> list[str]:
        """Every advertised address, each ending in ``/p2p/<PeerId>``."""
        return [str(a) for a in self.host.get_addrs()]

    async def connect(self, info: PeerInfo, timeout: float | None = None) -> None:
        """Dial a peer (no-op when connected): its direct addresses first, then its relayed
        ones (``/p2p-circuit``); raises :class:`DialError`."""
        limit = self.config.dial_timeout if timeout is None else timeout
        if self.host.get_network().get_connections(info.peer_id):
            return
        addrs = list(info.addrs) or list(self.host.get_peerstore().addrs(info.peer_id))
        direct = [a for a in addrs if not is_circuit(a)]
        relayed = [a for a in addrs if is_circuit(a)]
        errors: list[str] = []
        if direct or not relayed:
            try:
                with trio.fail_after(limit):
                    await self.host.connect(PeerInfo(info.peer_id, direct))
                return
            except trio.TooSlowError:
                errors.append(f"direct dial timed out after {limit:g} s")
            except Exception as exc:  # py-libp2p raises many types for a failed dial
                errors.append(str(exc) or type(exc).__name__)
        for addr in relayed:
            try:
                await self.relay_dialer.dial(addr, limit)
                return
            except DialError as exc:
                errors.append(str(exc))
        raise DialError(f"cannot dial {info.peer_id}: {'; '.join(errors)}")

    def path_to(self, peer_id: ID) -> str | None:
        """How this node is connected to ``peer_id``: "direct" when any connection is,
        "relayed" when only relayed ones are, None when not connected."""
        conns = self.host.get_network().get_connections(peer_id)
        if not conns:
            return None
        for conn in conns:
            try:
                addrs = conn.get_transport_addresses()
            except Exception:  # an odd connection type: not known to be relayed
                return "direct"
            if not any(is_circuit(a) for a in addrs):
                return "direct"
        return "relayed"

    def validator_infos(self) -> list[PeerInfo]:
        """The bootstrap validators, as configured."""
        return [i for i in self._bootstrap_infos if i.peer_id != self.peer_id]

    async def make_reachable(self, nursery: trio.Nursery) -> str:
        """Find out whether others can dial this node; when they cannot, reserve on relays
        (kept in ``nursery``) and advertise only the relayed addresses. Returns "direct"
        or "relayed"; raises :class:`NetworkError` when the node cannot be reached at all.
        """
        mode = self.config.reachability
        if mode == "auto":
            servers = [
                i.peer_id
                for i in self.validator_infos()
                if self.host.get_network().get_connections(i.peer_id)
            ]
            own = expand_addrs(self.host.get_transport_addrs())
            verdict = await check_reachability(self.host, servers, own)
            logger.info("reachability: %s (asked %d validator(s))", verdict, len(servers))
            # No verdict (validators without AutoNAT): keep the old behaviour, direct.
            mode = "private" if verdict is Reachability.PRIVATE else "public"
        if mode == "public":
            self.path = "direct"
            return self.path

        def changed() -> None:
            self.addrs_changed.set()
            self.addrs_changed = trio.Event()

        reservations = Reservations(
            self.host,
            self.relay_protocol,
            self.validator_infos,
            want=self.config.reservations,
            on_change=changed,
        )
        await reservations.maintain()
        if not reservations.held:
            raise NetworkError(
                'this node is not reachable (behind NAT, or reachability = "private") and '
                "no validator accepted a relay reservation"
            )
        advertise(self.host, reservations.addrs)
        self.reservations = reservations
        nursery.start_soon(reservations.run)
        self.path = "relayed"
        return self.path

    async def bootstrap(self) -> int:
        """Connect to every bootstrap peer not connected; return how many are connected."""
        connected = 0
        for info in self._bootstrap_infos:
            if info.peer_id == self.peer_id:
                continue
            if not self.host.get_network().get_connections(info.peer_id):
                try:
                    await self.connect(info)
                except DialError as exc:
                    logger.warning("bootstrap peer %s unreachable: %s", info.peer_id, exc)
                    continue
            await self.dht.add_bootstrap_peer(info.peer_id)
            connected += 1
        return connected

    async def reconnect_bootstrap(self) -> int:
        """Close the connections to the bootstrap peers and dial them again; return how
        many are connected."""
        network = self.host.get_network()
        for info in self._bootstrap_infos:
            if network.get_connections(info.peer_id):
                try:
                    await network.close_peer(info.peer_id)
                except Exception as exc:  # closing a broken connection may fail; dial anyway
                    logger.debug("closing the connection to %s failed: %s", info.peer_id, exc)
        return await self.bootstrap()

    async def _maintain_bootstrap(self) -> None:
        while True:
            await trio.sleep(self.config.bootstrap_interval)
            await self.bootstrap()

    async def ping(self, peer_id: ID, timeout: float = 5.0) -> float:
        """Round-trip time to a connected peer in seconds, over ``/ipfs/ping/1.0.0``."""
        start = time.perf_counter()
        with trio.fail_after(timeout):
            await PingService(self.host).ping(peer_id, ping_amt=1)
        return time.perf_counter() - start


async def _close_host(host: IHost) -> None:
    """Close every connection and listener, even while being cancelled. py-libp2p's
    ``host.run`` leaves connections open on exit; peers would only notice much later."""
    with trio.CancelScope(shield=True), trio.move_on_after(5):
        await close_connections(host)
        await host.close()


async def close_connections(host: IHost) -> None:
    """Close every connection of ``host`` at once. py-libp2p's ``host.close`` closes them
    one after another and each close sleeps 0.2 s (0.1 s in Yamux, 0.1 s in the swarm's
    cleanup): 0.4 s for a client's two connections, and a validator's hundreds were cut off
    by the 5 s bound. At once, all of them take those 0.2 s together."""

    async def close(conn: INetConn) -> None:
        try:
            await conn.close()
        except Exception as exc:  # as py-libp2p's own close: report, go on with the rest
            logger.warning("error closing a connection to %s: %s", conn.muxed_conn.peer_id, exc)

    async with trio.open_nursery() as nursery:
        for conn in host.get_network().get_connections():
            nursery.start_soon(close, conn)


def single_error(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The one real error inside nested exception groups (``Cancelled`` ignored), if any.

    py-libp2p's services run in strict nurseries, so an exception raised inside
    :func:`open_node` would otherwise reach callers wrapped several groups deep.
    """
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        elif not isinstance(exc, trio.Cancelled):
            leaves.append(exc)

    walk(group)
    return leaves[0] if len(leaves) == 1 else None


async def stop_auto_connector(host: IHost) -> None:
    """Stop py-libp2p's AutoConnector. A host with fewer than 50 connections dials up to 32
    peers of its peerstore every 10 s: executors and clients, whose peerstores hold the
    providers their lookups returned, connected to each other (33 connections each with 40
    executors; clients to every executor). lloom dials whom it needs: validators, and the
    executors a request goes to."""
    connector = getattr(host.get_network(), "auto_connector", None)
    if connector is not None:
        await connector.stop()


@asynccontextmanager
async def open_node(identity: Identity, config: NodeConfig) -> AsyncIterator[Node]:
    """Start a node, bootstrap it, keep it bootstrapped; stop everything on exit.

    An exception raised by the body comes out as itself, not wrapped in the exception
    groups of py-libp2p's nurseries.
    """
    try:
        async with _open_node(identity, config) as node:
            yield node
    except BaseExceptionGroup as group:
        leaf = single_error(group)
        if leaf is None:
            raise
        raise leaf from None


@asynccontextmanager
async def _open_node(identity: Identity, config: NodeConfig) -> AsyncIterator[Node]:
    apply_all()
    host = build_host(identity, config.listen, config.announce or None, server=config.dht_server)
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(host.run(config.listen))
        stack.push_async_callback(_close_host, host)
        await stop_auto_connector(host)
        node = Node(identity, config, host)
        await stack.enter_async_context(background_trio_service(node.dht.kad))
        await stack.enter_async_context(background_trio_service(node.relay_protocol))
        if config.dht_server:
            serve_autonat(host)
        elif config.hole_punch:
            await stack.enter_async_context(
                background_trio_service(DCUtRProtocol(host, dial_timeout=HOLE_PUNCH_DIAL_SECS))
            )
        if config.pubsub:
            router = GossipSub(
                protocols=[PROTOCOL_ID_V11],
                degree=6,
                degree_low=4,
                degree_high=12,
                heartbeat_interval=1,
            )
            node.pubsub = Pubsub(host, router)
            await stack.enter_async_context(background_trio_service(node.pubsub))
            await stack.enter_async_context(background_trio_service(router))
            await node.pubsub.wait_until_ready()
        await node.bootstrap()
        nursery = await stack.enter_async_context(trio.open_nursery())
        node.dht.gate.nursery = nursery
        if node.lan is not None:
            # Stopped (its goodbye sent) with the nursery, before the host closes.
            await nursery.start(node.lan.run)
        if node._bootstrap_infos:
            nursery.start_soon(node._maintain_bootstrap)
        try:
            yield node
        finally:
            nursery.cancel_scope.cancel()
