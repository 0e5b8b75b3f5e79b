"""Workarounds for defects of py-libp2p 0.8.1, applied once, each with a test.

- :func:`apply_dial_fix` (in :mod:`lloom.node.host`): no happy-eyeballs stall per dial.
- :func:`keep_providers_with_stale_records`: a provider (or a DHT response) whose signed
  peer record is *older* than one already held was dropped ("invalid-signed-record,
  skipping provider"), which hides js-libp2p executors; a validly signed record for the
  right peer is now accepted even when stale, and only the stale record itself is ignored.

The other workarounds (fresh provider lookups, dead-peer removal, provider dedupe) live
in :mod:`lloom.node.dht` because they are behaviour of our wrapper, not patches.
"""

from __future__ import annotations

import logging
from typing import Any

import libp2p.kad_dht.provider_store as provider_store_module
from libp2p.kad_dht import peer_routing
from libp2p.kad_dht.pb.kademlia_pb2 import Message
from libp2p.kad_dht.utils import maybe_consume_signed_record as original_consume
from libp2p.peer.envelope import consume_envelope
from libp2p.peer.id import ID

from lloom.node.host import apply_dial_fix

logger = logging.getLogger(__name__)

_PEER_RECORD_DOMAIN = "libp2p-peer-record"


def _record_is_authentic(msg: Any, expected: ID | None) -> bool:
    """True if ``msg`` carries a correctly signed peer record of the right peer."""
    if isinstance(msg, Message):
        if not msg.HasField("senderRecord"):
            return True
        raw = msg.senderRecord
    else:
        if not msg.HasField("signedRecord"):
            return True
        raw = msg.signedRecord
        expected = ID(msg.id)
    try:
        _envelope, record = consume_envelope(raw, _PEER_RECORD_DOMAIN)
    except Exception:  # any parse or signature failure: not authentic
        return False
    return expected is None or record.peer_id == expected


def tolerant_consume_signed_record(msg: Any, host: Any, peer_id: ID | None = None) -> bool:
    """Like py-libp2p's ``maybe_consume_signed_record``, but a validly signed record
    that is merely older than the one held does not cause the peer to be dropped."""
    if original_consume(msg, host, peer_id):
        return True
    if _record_is_authentic(msg, peer_id):
        logger.debug("keeping a peer whose signed record is older than the one held")
        return True
    return False


def keep_providers_with_stale_records() -> None:
    """Install :func:`tolerant_consume_signed_record` in the provider lookup path."""
    provider_store_module.maybe_consume_signed_record = tolerant_consume_signed_record  # type: ignore[attr-defined]


def start_lookups_at_servers() -> None:
    """Workaround: with fewer than 5 peers in its routing table (a network of a few
    validators), py-libp2p seeds every lookup with every peer of its peerstore and keeps the
    20 closest to the key: executors it heard of (DHT clients, "protocol not supported"),
    which can leave the validators out altogether; 54 of 60 lookups came back empty in
    bench/scale.py with 3 validators and 40 executors. Lookups start from the routing table
    (validators) only."""
    peer_routing.MIN_PEERS_THRESHOLD = 0


def apply_all() -> None:
    """Apply every module-level workaround (idempotent)."""
    apply_dial_fix()
    start_lookups_at_servers()
    keep_providers_with_stale_records()
