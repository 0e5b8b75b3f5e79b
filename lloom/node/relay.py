"""Circuit relay v2: validators relay, executors behind NAT reserve, clients dial circuits.

py-libp2p 0.8.1 ships the protocol (``libp2p.relay.circuit_v2``) but not as a host option;
lloom wires it by hand and works around what is broken (each with a test in
``tests/node/test_relay.py``; the list with its reasons is in docs/node.md):

- **One message per HOP stream.** py-libp2p's HOP handler loops on a stream after the
  reservation or circuit ended: every reservation logged an ERROR, answered
  MALFORMED_MESSAGE and slept 0.5 s. :class:`HopService` reads one message and closes, as
  go- and rust-libp2p relays do.
- **A reservation is the reserving peer's own.** py-libp2p reserved for any PeerId named in
  the RESERVE message, so one peer could fill the relay's slots with other peers' names.
- **Circuits are torn down one by one.** py-libp2p kept one circuit per destination in a
  dict: when one client's circuit to an executor ended, the relay closed the streams of
  the executor's *other* circuits. :class:`HopService` pumps each circuit on its own, and
  closes an idle circuit at its deadline too (py-libp2p checked the deadline only when
  data arrived).
- **Limits an operator can set** (:class:`RelaySettings`): reservations in total and per
  IP address, circuits at once in total and per executor, per-circuit duration and bytes,
  reservation lifetime. Refusals go out as RESOURCE_LIMIT_EXCEEDED and are counted
  (:class:`RelayStats`) and logged.
- **Dialing a circuit.** ``swarm.dial_peer`` drops every ``/p2p-circuit`` address and the
  relay transport's own ``dial_peer_info`` sleeps 1 + 2 + 4 s before failing when it knows
  no circuit: :class:`RelayDialer` connects to the relay named in the address, asks it for
  the circuit and upgrades the result itself, under one deadline.
- **Advertising relayed addresses.** ``BasicHost.get_addrs`` cuts every address at its
  first ``/p2p/``, so a circuit address became the relay's IP with our PeerId:
  :func:`advertise` replaces the host's ``get_addrs`` with the node's own list.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import trio
from libp2p.abc import IHost, INetStream
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode as _StatusCode
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.relay.circuit_v2.utils import (
    maybe_consume_signed_record,
    read_delimited_msg,
)
from multiaddr import Multiaddr

from lloom.errors import DialError, UsageError

logger = logging.getLogger(__name__)

__all__ = [
    "HOP_PROTOCOL_ID",
    "HopService",
    "RelayDialer",
    "RelaySettings",
    "RelayStats",
    "advertise",
    "circuit_addr",
    "is_circuit",
    "parse_circuit",
]

#: Seconds a relay waits for the one message of a HOP stream.
HOP_READ_TIMEOUT = 10.0
#: Largest read of one relayed chunk.
PUMP_READ = 64 * 1024


@dataclass(frozen=True)
class RelaySettings:
    """What a validator relays for executors behind NAT (``[node.relay]``).

    Token streams are a few kB/s, so the defaults carry many executors: 1,024 reservations,
    at most 16 from one IP address (an office's GPUs share one), 1,024 circuits at once and
    64 per executor, each circuit up to an hour and 1 GiB.
    """

    enabled: bool = True
    max_reservations: int = 1024
    max_reservations_per_ip: int = 16
    max_circuits: int = 1024
    max_circuits_per_peer: int = 64
    circuit_duration_secs: int = 3600
    circuit_bytes: int = 1 << 30
    reservation_ttl_secs: int = 3600

    def __post_init__(self) -> None:
        for name in (
            "max_reservations",
            "max_reservations_per_ip",
            "max_circuits",
            "max_circuits_per_peer",
            "reservation_ttl_secs",
        ):
            if getattr(self, name) < 1:
                raise UsageError(f"relay {name} must be at least 1")
        if self.circuit_duration_secs < 0 or self.circuit_bytes < 0:
            raise UsageError("relay circuit_duration_secs and circuit_bytes must be >= 0")
        if self.reservation_ttl_secs < 120:
            # The executor renews at half the lifetime; py-libp2p's own refresher spun
            # when it was 30 s or less.
            raise UsageError("relay reservation_ttl_secs must be at least 120")

    def limits(self) -> RelayLimits:
        """py-libp2p's limits object for these settings."""
        return RelayLimits(
            duration=self.circuit_duration_secs,
            data=self.circuit_bytes,
            max_circuit_conns=self.max_circuits_per_peer,
            max_reservations=self.max_reservations,
            reservation_ttl=self.reservation_ttl_secs,
        )


@dataclass
class RelayStats:
    """Counters of one relay, for logs and the status of a validator."""

    reservations_accepted: int = 0
    reservations_refused: int = 0
    circuits_opened: int = 0
    circuits_refused: int = 0
    circuits_active: int = 0
    circuits_cut: int = 0
    bytes_relayed: int = 0
    refusals: Counter[str] = field(default_factory=Counter)

    def refuse(self, what: str, reason: str) -> None:
        """Count one refusal of a reservation or circuit."""
        if what == "reservation":
            self.reservations_refused += 1
        else:
            self.circuits_refused += 1
        self.refusals[reason] += 1

    def as_dict(self) -> dict[str, object]:
        """A JSON-able view."""
        return {
            "reservations_accepted": self.reservations_accepted,
            "reservations_refused": self.reservations_refused,
            "circuits_opened": self.circuits_opened,
            "circuits_refused": self.circuits_refused,
            "circuits_active": self.circuits_active,
            "circuits_cut": self.circuits_cut,
            "bytes_relayed": self.bytes_relayed,
            "refusals": dict(self.refusals),
        }


def _remote_ip(stream: INetStream) -> str:
    try:
        remote = stream.get_remote_address()
    except Exception:  # a stream over an odd transport: count it under one key
        return "?"
    return str(remote[0]) if remote else "?"


class HopService(CircuitV2Protocol):
    """A validator's relay: py-libp2p's HOP protocol with lloom's limits and fixes."""

    def __init__(self, host: IHost, settings: RelaySettings | None = None) -> None:
        self.settings = settings or RelaySettings()
        super().__init__(host, limits=self.settings.limits(), allow_hop=True)
        self.stats = RelayStats()
        self._reserved_ip: dict[ID, str] = {}
        #: Circuits being pumped, by their pair of streams (either direction).
        self._circuits: set[frozenset[int]] = set()

    # -- reservations ---------------------------------------------------------------

    def _active_reservations_from(self, ip: str) -> int:
        live = self.resource_manager._reservations
        return sum(
            1
            for peer, peer_ip in self._reserved_ip.items()
            if peer_ip == ip and peer in live and not live[peer].is_expired()
        )

    async def _reserve(self, stream: INetStream, msg: HopMessage) -> None:
        peer = stream.muxed_conn.peer_id
        msg.ClearField("peer")  # a reservation is for the peer that asks, never another
        manager = self.resource_manager
        if not manager.has_reservation(peer):
            ip = _remote_ip(stream)
            reason = None
            if not manager.can_accept_reservation(peer):
                reason = "reservations"
            elif self._active_reservations_from(ip) >= self.settings.max_reservations_per_ip:
                reason = "reservations_per_ip"
            if reason is not None:
                self.stats.refuse("reservation", reason)
                logger.warning(
                    "relay: refused a reservation of %s from %s (%s limit; %d refused so far)",
                    peer,
                    ip,
                    reason,
                    self.stats.reservations_refused,
                )
                await self._send_status(stream, _StatusCode.RESOURCE_LIMIT_EXCEEDED, reason)
                return
            self._reserved_ip[peer] = ip
            self.stats.reservations_accepted += 1
            logger.info("relay: reservation for %s from %s", peer, ip)
        await self._handle_reserve(stream, msg)

    # -- circuits -------------------------------------------------------------------

    async def _connect(self, stream: INetStream, msg: HopMessage) -> None:
        if self.stats.circuits_active >= self.settings.max_circuits:
            self.stats.refuse("circuit", "circuits")
            logger.warning(
                "relay: refused a circuit from %s (circuits limit %d; %d refused so far)",
                stream.muxed_conn.peer_id,
                self.settings.max_circuits,
                self.stats.circuits_refused,
            )
            await self._send_status(stream, _StatusCode.RESOURCE_LIMIT_EXCEEDED, "circuits")
            return
        target = ID(msg.peer.id) if msg.HasField("peer") else None
        reservation = self.resource_manager.get_reservation(target) if target else None
        if reservation is not None and not reservation.can_accept_connection():
            self.stats.refuse("circuit", "circuits_per_peer")
            logger.warning(
                "relay: refused a circuit to %s (circuits_per_peer limit %d)",
                target,
                self.settings.max_circuits_per_peer,
            )
            await self._send_status(
                stream, _StatusCode.RESOURCE_LIMIT_EXCEEDED, "circuits_per_peer"
            )
            return
        self.stats.circuits_active += 1
        try:
            await self._handle_connect(stream, msg)
        finally:
            self.stats.circuits_active -= 1

    async def _handle_hop_stream(self, stream: INetStream) -> None:
        """One HOP message per stream: RESERVE or CONNECT, then the stream is done."""
        try:
            if any("/p2p-circuit" in str(a) for a in stream.muxed_conn.get_transport_addresses()):
                # Spec: no reservations or circuits over a relayed connection.
                await self._send_status(stream, _StatusCode.PERMISSION_DENIED, "relayed")
                return
            with trio.fail_after(HOP_READ_TIMEOUT):
                msg = await read_delimited_msg(stream, HopMessage)
            if msg.HasField("senderRecord") and not maybe_consume_signed_record(
                msg, self.host, stream.muxed_conn.peer_id
            ):
                return
            if msg.type == HopMessage.RESERVE:
                await self._reserve(stream, msg)
            elif msg.type == HopMessage.CONNECT:
                await self._connect(stream, msg)
            else:
                await self._send_status(stream, _StatusCode.MALFORMED_MESSAGE, "bad type")
        except (trio.TooSlowError, Exception) as exc:  # a hostile or broken peer
            logger.debug("relay: HOP stream from %s ended: %s", _peer_of(stream), exc)
        finally:
            await self._close_stream(stream)

    async def _relay_data(
        self,
        src_stream: INetStream,
        dst_stream: INetStream,
        peer_id: ID,
        deadline: float | None = None,
        circuit_data_limit: list[int] | None = None,
    ) -> None:
        """Pump one direction of one circuit; close both ends when it ends."""
        self._circuits.add(_circuit_key(src_stream, dst_stream))
        try:
            while True:
                left = math.inf if deadline is None else deadline - time.monotonic()
                data = b""
                with trio.move_on_after(max(left, 0)) as scope:
                    with contextlib.suppress(Exception):  # reset/EOF of a stream: the end
                        data = await src_stream.read(PUMP_READ)
                if scope.cancelled_caught:
                    self._count_cut(src_stream, dst_stream, peer_id, "duration")
                    return
                if not data:
                    return
                if circuit_data_limit is not None:
                    if len(data) > circuit_data_limit[0]:
                        self._count_cut(src_stream, dst_stream, peer_id, "data")
                        return
                    circuit_data_limit[0] -= len(data)
                with trio.fail_after(self.write_timeout):
                    await dst_stream.write(data)
                self.stats.bytes_relayed += len(data)
        except Exception as exc:  # the other end went away
            logger.debug("relay: circuit to %s ended: %s", peer_id, exc)
        finally:
            await self._close_stream(src_stream)
            await self._close_stream(dst_stream)
            self._active_relays.pop(peer_id, None)
            self._circuits.discard(_circuit_key(src_stream, dst_stream))

    def _count_cut(self, src: INetStream, dst: INetStream, peer_id: ID, limit: str) -> None:
        """Count a circuit cut by a limit once, though both directions notice it."""
        if _circuit_key(src, dst) in self._circuits:
            self._circuits.discard(_circuit_key(src, dst))
            self.stats.circuits_cut += 1
            logger.info("relay: a circuit to %s reached its %s limit", peer_id, limit)


def _circuit_key(a: INetStream, b: INetStream) -> frozenset[int]:
    return frozenset((id(a), id(b)))


def _peer_of(stream: INetStream) -> str:
    try:
        return str(stream.muxed_conn.peer_id)
    except Exception:
        return "?"


# -- addresses ----------------------------------------------------------------------


def is_circuit(addr: Multiaddr | str) -> bool:
    """True for a ``/p2p-circuit`` address."""
    return "/p2p-circuit" in str(addr)


def circuit_addr(relay_addr: Multiaddr, relay: ID, target: ID) -> Multiaddr:
    """``<relay addr>/p2p/<relay>/p2p-circuit/p2p/<target>``."""
    base = str(relay_addr).split("/p2p/")[0]
    return Multiaddr(f"{base}/p2p/{relay}/p2p-circuit/p2p/{target}")


def parse_circuit(addr: Multiaddr | str) -> tuple[PeerInfo, ID]:
    """The relay (with its address) and the target of a circuit address.

    Raises :class:`DialError` naming the address when it is not
    ``/<transport>/p2p/<relay>/p2p-circuit/p2p/<target>``.
    """
    text = str(addr)
    relay_part, sep, target_part = text.partition("/p2p-circuit")
    if not sep or not target_part.startswith("/p2p/") or "/p2p-circuit" in target_part:
        raise DialError(f"malformed relay address {text!r}: expected …/p2p-circuit/p2p/<PeerId>")
    try:
        target = ID.from_base58(target_part.removeprefix("/p2p/").strip("/"))
        relay = info_from_p2p_addr(Multiaddr(relay_part))
    except Exception as exc:  # multiaddr and base58 raise several types
        raise DialError(f"malformed relay address {text!r}: {exc}") from None
    if not relay.addrs or not str(relay.addrs[0]).strip("/"):
        raise DialError(f"malformed relay address {text!r}: the relay has no address")
    return relay, target


def advertise(host: IHost, addrs: Callable[[], Sequence[Multiaddr]]) -> None:
    """Make ``host.get_addrs()`` (identify, peer records, DHT provider records) return
    ``addrs()``, every address as given (see the module doc: BasicHost cuts circuits)."""
    me = str(host.get_id())

    def get_addrs() -> list[Multiaddr]:
        out = []
        for addr in addrs():
            text = str(addr)
            out.append(addr if text.endswith(f"/p2p/{me}") else Multiaddr(f"{text}/p2p/{me}"))
        return out

    host.get_addrs = get_addrs  # type: ignore[method-assign]


# -- dialing --------------------------------------------------------------------------


class RelayDialer:
    """Opens relayed connections for a node (the STOP role only: a dial never reserves)."""

    def __init__(self, host: IHost, protocol: CircuitV2Protocol) -> None:
        self.host = host
        self.transport = CircuitV2Transport(host, protocol, RelayConfig(roles=RelayRole.STOP))

    async def dial(self, addr: Multiaddr, timeout: float) -> None:
        """Connect to the target of circuit ``addr`` through its relay; raises
        :class:`DialError`."""
        relay, target = parse_circuit(addr)
        try:
            with trio.fail_after(timeout):
                await self.host.connect(relay)
                raw = await self.transport._dial_via_circuit_addr(addr, PeerInfo(target, [addr]))
                await self.host.upgrade_outbound_connection(raw, target)
        except trio.TooSlowError:
            raise DialError(f"relayed dial of {target} via {relay.peer_id} timed out") from None
        except Exception as exc:  # py-libp2p raises many types for a failed dial
            raise DialError(f"relayed dial of {target} via {relay.peer_id} failed: {exc}") from exc
