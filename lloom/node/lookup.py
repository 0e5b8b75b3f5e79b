"""Telling "no provider" from "no answer" (a workaround for py-libp2p 0.8.1).

py-libp2p's ``KadDHT.find_providers`` swallows every failure of the peers it asks (a stream
refused or reset by a busy DHT server, a timeout, a malformed answer) and returns what it
found, so a lookup that reached nobody returns ``[]`` — exactly what a lookup returns when
no executor serves the model. A client that believed it would answer "no executor" (404,
exit 3) while executors serve the model. :func:`ask_providers` sends the Kademlia
GET_PROVIDERS request itself and says whether the peer answered; :class:`lloom.node.dht.Dht`
uses it to check an empty lookup with every DHT server it knows, and raises
:class:`~lloom.errors.DiscoveryFailed` when none of them answered.
"""

from __future__ import annotations

import logging

import trio
from google.protobuf.message import DecodeError
from libp2p.abc import IHost
from libp2p.custom_types import TProtocol
from libp2p.kad_dht.common import PROTOCOL_ID
from libp2p.kad_dht.pb.kademlia_pb2 import Message
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.utils.varint import encode_varint_prefixed, read_varint_prefixed_bytes_limited
from multiaddr import Multiaddr

logger = logging.getLogger(__name__)

#: Largest GET_PROVIDERS answer read (20 providers with a few addresses each are ~4 KiB).
MAX_ANSWER_BYTES = 1 << 20


async def ask_providers(
    host: IHost, peer: ID, multihash: bytes, timeout: float = 5.0
) -> list[PeerInfo] | None:
    """The providers of ``multihash`` that DHT server ``peer`` holds, or None if it did
    not answer (no stream, reset, timeout, or an answer that is not a GET_PROVIDERS)."""
    request = Message()
    request.type = Message.MessageType.GET_PROVIDERS
    request.key = multihash
    data = request.SerializeToString()
    try:
        with trio.fail_after(timeout):
            stream = await host.new_stream(peer, [TProtocol(PROTOCOL_ID)])
            try:
                await stream.write(encode_varint_prefixed(data))
                raw = await read_varint_prefixed_bytes_limited(stream, MAX_ANSWER_BYTES)
            finally:
                await stream.close()
        answer = Message()
        answer.ParseFromString(raw)
    except (Exception, trio.TooSlowError, DecodeError) as exc:  # py-libp2p raises many types
        logger.debug("DHT server %s did not answer GET_PROVIDERS: %s", peer, exc)
        return None
    if answer.type != Message.MessageType.GET_PROVIDERS:
        return None
    providers = []
    for record in answer.providerPeers:
        try:
            providers.append(PeerInfo(ID(record.id), [Multiaddr(a) for a in record.addrs]))
        except Exception as exc:  # a malformed record: skip it, keep the others
            logger.debug("skipping a malformed provider record from %s: %s", peer, exc)
    return providers
