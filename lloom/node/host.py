"""Build a py-libp2p host the way every lloom node needs it.

TCP only, **Noise only** (plaintext and SECIO are not offered, so dialers that cannot speak
Noise are refused), Yamux only, the node's secp256k1 key as its libp2p identity. Identify
and ping are enabled by py-libp2p's basic host.
"""

from __future__ import annotations

from collections.abc import Sequence

import libp2p
import libp2p.network.swarm
from libp2p import new_host
from libp2p.abc import IHost
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
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


def build_host(
    identity: Identity,
    listen_addrs: Sequence[Multiaddr] = (),
    announce_addrs: Sequence[Multiaddr] | None = None,
) -> IHost:
    """A host keyed by ``identity``: TCP, Noise only, Yamux only.

    It advertises ``announce_addrs`` when given (a public address behind NAT), else its
    listen addresses with wildcards expanded to the machine's interfaces.
    """
    apply_dial_fix()
    noise = NoiseTransport(identity.keypair, noise_privkey=create_x25519_key_pair().private_key)
    return new_host(
        key_pair=identity.keypair,
        sec_opt={NOISE_PROTOCOL_ID: noise},
        muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
        listen_addrs=list(listen_addrs) or None,
        announce_addrs=list(announce_addrs) if announce_addrs else None,
        addrs_factory=None if announce_addrs else expand_addrs,
        enable_tcp=True,
    )
