"""Build a py-libp2p host the way every lloom node needs it.

TCP only, **Noise only** (plaintext and SECIO are not offered, so dialers that cannot speak
Noise are refused), Yamux only, the node's secp256k1 key as its libp2p identity. Identify
and ping are enabled by py-libp2p's basic host.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import libp2p
import libp2p.network.swarm
from libp2p import new_host
from libp2p.abc import IHost
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.config import ConnectionConfig
from libp2p.peer.peerstore import PeerStore
from libp2p.rcmgr import ResourceLimits, new_resource_manager
from libp2p.rcmgr.connection_limits import ConnectionLimits
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.utils.address_validation import expand_wildcard_address
from multiaddr import Multiaddr

from lloom.identity import Identity

_WILDCARDS = ("0.0.0.0", "::")  # noqa: S104 - recognising, not binding


def apply_dial_fix() -> None:
    """Workaround: py-libp2p 0.8.1 waits the whole happy-eyeballs delay (~250 ms) on
    every dial, even when the only address has already connected. Setting the module
    global to 0 makes a loopback dial + Noise + Yamux take ~10 ms."""
    libp2p.network.swarm._HAPPY_EYEBALLS_DELAY = 0


def is_wildcard(addr: Multiaddr) -> bool:
    """True for ``/ip4/0.0.0.0/...`` and ``/ip6/::/...``."""
    parts = str(addr).split("/")
    return len(parts) > 2 and parts[2] in _WILDCARDS


def expand_addrs(addrs: Sequence[Multiaddr]) -> list[Multiaddr]:
    """Replace wildcard listen addresses by this machine's interface addresses, so that
    what a node advertises (in provider records and its ready line) can be dialled."""
    out: list[Multiaddr] = []
    for addr in addrs:
        for concrete in expand_wildcard_address(addr) if is_wildcard(addr) else [addr]:
            if concrete not in out:
                out.append(concrete)
    return out


#: Connections a validator (DHT server) keeps: executors and clients together.
#: py-libp2p's defaults admit 250 inbound connections (``max_connections`` 300 minus
#: ``min_connections`` 50) and its resource manager 256: a validator served at most 250
#: executors and clients (bench/scale.py measured it).
SERVER_MAX_CONNECTIONS = 10_000
#: Peers a node's peerstore keeps. py-libp2p keeps 1,000 and then evicts peers without
#: addresses first, which is the node's own entry: its key is gone and the next identify
#: raises ``PeerStoreError`` out of the host: the node stopped at its 1,001st peer.
MAX_PEERS = 200_000


def server_limits() -> dict[str, Any]:
    """The ``new_host`` options of a validator: connection limits for many peers."""
    most = SERVER_MAX_CONNECTIONS
    return {
        "connection_config": ConnectionConfig(
            max_connections=most, high_watermark=most, low_watermark=most // 2
        ),
        "resource_manager": new_resource_manager(
            limits=ResourceLimits(max_connections=most, max_memory_mb=4096, max_streams=20 * most),
            connection_limits=ConnectionLimits(
                max_pending_inbound=256,
                max_pending_outbound=64,
                max_established_inbound=most,
                max_established_outbound=most,
                max_established_per_peer=8,
                max_established_total=most,
            ),
        ),
    }


def build_host(
    identity: Identity,
    listen_addrs: Sequence[Multiaddr] = (),
    announce_addrs: Sequence[Multiaddr] | None = None,
    *,
    server: bool = False,
) -> IHost:
    """A host keyed by ``identity``: TCP, Noise only, Yamux only.

    It advertises ``announce_addrs`` when given (a public address behind NAT), else its
    listen addresses with wildcards expanded to the machine's interfaces. A ``server``
    (validator) accepts up to :data:`SERVER_MAX_CONNECTIONS` connections; every node's
    peerstore holds up to :data:`MAX_PEERS` peers.
    """
    apply_dial_fix()
    noise = NoiseTransport(identity.keypair, noise_privkey=create_x25519_key_pair().private_key)
    extra = server_limits() if server else {}
    return new_host(
        peerstore_opt=PeerStore(max_records=2 * MAX_PEERS, max_peers=MAX_PEERS),
        **extra,
        key_pair=identity.keypair,
        sec_opt={NOISE_PROTOCOL_ID: noise},
        muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
        listen_addrs=list(listen_addrs) or None,
        announce_addrs=list(announce_addrs) if announce_addrs else None,
        addrs_factory=None if announce_addrs else expand_addrs,
        enable_tcp=True,
    )
