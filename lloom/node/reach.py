"""Is this node reachable, and if not, relay reservations that make it so.

- **Reachability.** Validators answer AutoNAT v1 (``/libp2p/autonat/1.0.0``) dial-back
  requests; an executor asks the validators it is connected to whether they can dial it.
  py-libp2p 0.8.1's AutoNAT server "dialled back" with ``host.connect``, a no-op on the
  connection the request came in on, so it vouched for any address (even one where
  nothing listens): :class:`DialBackAutoNAT` dials the address on a fresh connection
  and closes it again. Only addresses on the requester's observed IP are dialled (the
  spec's amplification guard), so an executor behind NAT, whose addresses are private,
  is refused at once and knows it is private.
- **Reservations.** A private executor keeps relay reservations on up to two validators
  (:class:`Reservations`): it renews each at half its lifetime, drops one whose
  validator went away and reserves on another, and advertises
  ``<validator addr>/p2p/<validator>/p2p-circuit/p2p/<executor>`` for each.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum

import trio
from libp2p.abc import IHost
from libp2p.host.autonat.autonat import AutoNATService
from libp2p.host.autonat.pb.autonat_pb2 import Message as AutoNATMessage
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from multiaddr import Multiaddr

from lloom.node.relay import HOP_PROTOCOL_ID, circuit_addr, is_circuit

logger = logging.getLogger(__name__)

#: Seconds a validator spends dialling one address back.
DIAL_BACK_TIMEOUT = 5.0
#: Most addresses a validator dials back for one request (a stranger may list hundreds).
MAX_DIAL_BACKS = 4
#: Seconds an executor waits for one validator's AutoNAT verdict.
VERDICT_TIMEOUT = 10.0
#: Seconds before a validator that refused a reservation is asked again.
REFUSED_BACKOFF = 60.0


class Reachability(StrEnum):
    """Whether others can dial this node."""

    PUBLIC = "public"
    PRIVATE = "private"
    UNKNOWN = "unknown"


class DialBackAutoNAT(AutoNATService):
    """py-libp2p's AutoNAT server with an honest dial-back (see the module doc)."""

    async def _try_dial(self, peer_id: ID, addrs: list[bytes]) -> bytes | None:
        network = self.host.get_network()
        for raw in addrs[:MAX_DIAL_BACKS]:
            try:
                addr = Multiaddr(raw)
                if is_circuit(addr):
                    continue
                with trio.fail_after(DIAL_BACK_TIMEOUT):
                    conn = await network.dial_addr(addr, peer_id)
            except Exception as exc:  # unreachable, wrong peer, timeout: not this one
                logger.debug("dial-back of %s at %r failed: %s", peer_id, raw, exc)
                continue
            with contextlib.suppress(Exception):
                await conn.close()
            return bytes(raw)
        return None


def serve_autonat(host: IHost) -> DialBackAutoNAT:
    """Answer AutoNAT dial-back requests on ``host`` (validators)."""
    return DialBackAutoNAT(host, serve=True)  # type: ignore[arg-type]


async def check_reachability(
    host: IHost, servers: Sequence[ID], addrs: Sequence[Multiaddr]
) -> Reachability:
    """Ask ``servers`` to dial ``addrs`` back: public when one could, private when those
    that answered could not, unknown when none answered."""
    client = AutoNATService(host, serve=False)  # type: ignore[arg-type]
    raw = [a.to_bytes() for a in addrs if not is_circuit(a)]
    if not raw:
        return Reachability.PRIVATE
    answered = 0
    for server in servers:
        try:
            status, _addr = await client.query_server(server, addrs=raw, timeout=VERDICT_TIMEOUT)
        except Exception as exc:  # no AutoNAT there, or the stream broke
            logger.debug("no reachability verdict from %s: %s", server, exc)
            continue
        answered += 1
        if status == AutoNATMessage.OK:
            return Reachability.PUBLIC
    return Reachability.PRIVATE if answered else Reachability.UNKNOWN


@dataclass
class Held:
    """One reservation: the relay's address and when the reservation ends."""

    relay: PeerInfo
    expires: float
    renew_at: float


class Reservations:
    """Relay reservations of a node behind NAT (see the module doc).

    ``candidates()`` lists relays in order of preference (the validators the node is
    connected to); ``on_change()`` is called whenever the set of relayed addresses changed.
    """

    def __init__(
        self,
        host: IHost,
        protocol: CircuitV2Protocol,
        candidates: Callable[[], Sequence[PeerInfo]],
        *,
        want: int = 2,
        on_change: Callable[[], None] = lambda: None,
        timeout: float = 10.0,
    ) -> None:
        self.host = host
        self.candidates = candidates
        self.want = want
        self.on_change = on_change
        self.timeout = timeout
        self.transport = CircuitV2Transport(
            host, protocol, RelayConfig(roles=RelayRole.STOP | RelayRole.CLIENT)
        )
        self.held: dict[ID, Held] = {}
        self._refused_until: dict[ID, float] = {}

    def addrs(self) -> list[Multiaddr]:
        """The relayed addresses to advertise, one per reservation."""
        me = self.host.get_id()
        return [circuit_addr(h.relay.addrs[0], peer, me) for peer, h in self.held.items()]

    def relays(self) -> list[ID]:
        """The validators holding a reservation."""
        return list(self.held)

    async def _reserve(self, relay: PeerInfo) -> Held | None:
        try:
            with trio.fail_after(self.timeout):
                stream = await self.host.new_stream(relay.peer_id, [HOP_PROTOCOL_ID])
                try:
                    ok = await self.transport._make_reservation(stream, relay.peer_id)
                finally:
                    with contextlib.suppress(Exception):
                        await stream.close()
        except Exception as exc:  # no relay there, refused, broken stream, timeout
            logger.info("no reservation on %s: %s", relay.peer_id, exc)
            return None
        if not ok:
            logger.warning("validator %s refused a relay reservation", relay.peer_id)
            return None
        now = time.time()
        expires = float(self.transport._reservations.get(relay.peer_id, now + 120))
        return Held(relay, expires, now + max(30.0, (expires - now) / 2))

    def _connected(self, peer: ID) -> bool:
        return bool(self.host.get_network().get_connections(peer))

    async def maintain(self) -> bool:
        """One round: drop lost reservations, renew due ones, add new ones up to
        ``want``; return True when the advertised addresses changed."""
        before = set(self.held)
        now = time.time()
        for peer, held in list(self.held.items()):
            if held.expires <= now or not self._connected(peer):
                logger.warning("relay reservation on %s lost", peer)
                del self.held[peer]
            elif held.renew_at <= now:
                renewed = await self._reserve(held.relay)
                if renewed is None:
                    del self.held[peer]
                    self._refused_until[peer] = now + REFUSED_BACKOFF
                else:
                    self.held[peer] = renewed
        for relay in self.candidates():
            if len(self.held) >= self.want:
                break
            peer = relay.peer_id
            if peer in self.held or self._refused_until.get(peer, 0) > now or not relay.addrs:
                continue
            if not self._connected(peer):
                continue
            got = await self._reserve(relay)
            if got is None:
                self._refused_until[peer] = now + REFUSED_BACKOFF
                continue
            logger.info("relay reservation on %s until %.0f s from now", peer, got.expires - now)
            self.held[peer] = got
        changed = set(self.held) != before
        if changed:
            self.on_change()
        return changed

    async def run(self, interval: float = 1.0) -> None:
        """Keep the reservations until cancelled."""
        while True:
            await trio.sleep(interval)
            try:
                await self.maintain()
            except Exception as exc:  # never let one bad round stop the node
                logger.error("relay reservations: %s", exc, exc_info=exc)
