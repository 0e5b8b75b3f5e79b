"""Workarounds for defects of py-libp2p 0.8.1, applied once, each with a test.

- :func:`apply_dial_fix` (in :mod:`lloom.node.host`): no happy-eyeballs stall per dial.
- :func:`close_dead_connections`: yamux pings every connection but never acted on a
  missing answer, so a peer whose cable was cut (no FIN, no RST) stayed "connected" for
  the kernel's retransmission timeout (~15 min): a validator kept handing out a dead
  executor, a client kept its pooled streams. A connection whose keep-alive ping goes
  unanswered for ``KEEPALIVE_TIMEOUT`` s is now closed.
- :func:`punch_from_listen_ports`: DCUtR takes the ports to punch from ``host.get_addrs()``;
  an executor behind NAT advertises only relayed addresses there, so it offered nothing to
  punch to. The ports are read from the node's listeners instead.
- :func:`release_inbound_slots`: an inbound connection held one of the swarm's inbound
  slots (``max_connections - min_connections``, 250 by default) until the whole swarm
  stopped, not until the connection closed: after its 250th inbound connection in its
  lifetime, with two still open, an executor refused every new one. The slot is now
  given back when the connection closes.
- :func:`keep_providers_with_stale_records`: a provider (or a DHT response) whose signed
  peer record is *older* than one already held was dropped ("invalid-signed-record,
  skipping provider"), which hides js-libp2p executors; a validly signed record for the
  right peer is now accepted even when stale, and only the stale record itself is ignored.

The per-message costs of Yamux and TCP (window updates, coalesced writes, buffered reads)
are patched in :mod:`lloom.node.muxer`.

The other workarounds (fresh provider lookups, dead-peer removal, provider dedupe) live
in :mod:`lloom.node.dht` because they are behaviour of our wrapper, not patches.
"""

from __future__ import annotations

import contextlib
import logging
import struct
from typing import Any, cast

import libp2p.kad_dht.provider_store as provider_store_module
import trio
from libp2p.abc import IMuxedConn
from libp2p.kad_dht import peer_routing
from libp2p.kad_dht.pb.kademlia_pb2 import Message
from libp2p.kad_dht.utils import maybe_consume_signed_record as original_consume
from libp2p.network import swarm as swarm_module
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.peer.envelope import consume_envelope
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2 import dcutr as dcutr_module
from libp2p.stream_muxer.yamux import yamux as yamux_module

from lloom.node import muxer
from lloom.node.host import apply_dial_fix, expand_addrs

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


#: Seconds between yamux keep-alive pings on every connection (py-libp2p: 30).
KEEPALIVE_INTERVAL = 10.0
#: Seconds a keep-alive ping may go unanswered before the connection is closed.
KEEPALIVE_TIMEOUT = 10.0
#: Seconds closing a dead connection may take.
CLOSE_TIMEOUT = 10.0


async def _keepalive_loop(self: Any) -> None:
    """py-libp2p's RTT loop (``Yamux._measure_rtt_loop``) that also closes a connection
    whose peer stopped answering."""
    await trio.sleep(0.5)
    while not self.event_shutting_down.is_set():
        try:
            self._ping_id += 1
            self._ping_event = trio.Event()
            header = struct.pack(
                yamux_module.YAMUX_HEADER_FORMAT,
                0,
                yamux_module.TYPE_PING,
                yamux_module.FLAG_SYN,
                0,
                self._ping_id,
            )
            with trio.move_on_after(KEEPALIVE_TIMEOUT):
                await self._write_frame(header)
            self._ping_sent_time = trio.current_time()
            with trio.move_on_after(KEEPALIVE_TIMEOUT) as waited:
                await self._ping_event.wait()
        except Exception:  # the connection went away: nothing to keep alive
            return
        if waited.cancelled_caught and not self.event_shutting_down.is_set():
            logger.info(
                "connection to %s is dead (no keep-alive answer in %g s); closing it",
                self.peer_id,
                KEEPALIVE_TIMEOUT,
            )
            # Not cut short: a close cancelled half-way leaves the connection listed.
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
                await self.close()
            return
        with trio.move_on_after(KEEPALIVE_INTERVAL):
            await self.event_shutting_down.wait()


def close_dead_connections() -> None:
    """Install :func:`_keepalive_loop` on every yamux connection."""
    yamux_module.Yamux._measure_rtt_loop = _keepalive_loop  # type: ignore[method-assign]


_original_inbound = swarm_module.Swarm._do_handle_inbound_connection


async def _until_closed(swarm: Any, muxed: Any) -> None:
    """Wait until ``muxed`` (a connection) closes, or the swarm stops."""
    closed = getattr(muxed, "event_closed", None)
    if isinstance(closed, trio.Event):
        await closed.wait()
    else:  # a muxer without the event: py-libp2p's own barrier
        await swarm.manager.wait_finished()


async def _handle_inbound(
    self: Any, read_write_closer: Any, maddr: Any, failure_event: Any
) -> None:
    """``Swarm._do_handle_inbound_connection`` whose handler (and inbound slot) lasts as
    long as its connection, not as long as the swarm. Pre-multiplexed transports (QUIC)
    keep py-libp2p's own path."""
    if isinstance(read_write_closer, IMuxedConn):
        await _original_inbound(self, cast(Any, read_write_closer), maddr, failure_event)
        return
    remote = self._build_remote_multiaddr(read_write_closer)
    if remote is not None and not await self.connection_gate.is_allowed(remote):
        logger.debug("inbound connection from %s denied by the connection gate", remote)
        with contextlib.suppress(Exception):
            await read_write_closer.close()
        return
    raw_conn = None
    try:
        raw_conn = RawConnection(read_write_closer, False)
        muxed = await self.upgrade_inbound_raw_conn(raw_conn, maddr)
        await _until_closed(self, muxed)  # trio's listener closes the socket on return
    except Exception as exc:  # as py-libp2p: the connection failed, close what is left
        logger.debug("inbound connection failed: %s", exc)
        with contextlib.suppress(Exception):
            await (raw_conn if raw_conn is not None else read_write_closer).close()


def release_inbound_slots() -> None:
    """Install :func:`_handle_inbound` on every swarm."""
    swarm_module.Swarm._do_handle_inbound_connection = _handle_inbound  # type: ignore[method-assign]


def _listen_ports(host: Any) -> list[tuple[int, str, int]]:
    """Our TCP listen addresses as DCUtR wants them: (family, ip, port)."""
    out: list[tuple[int, str, int]] = []
    for addr in expand_addrs(host.get_transport_addrs()):
        parsed = dcutr_module._tcp_ip_port(addr)
        if parsed is not None and parsed not in out:
            out.append(parsed)
    return out


def punch_from_listen_ports() -> None:
    """Install :func:`_listen_ports` as DCUtR's source of local ports."""
    dcutr_module._local_tcp_listen_addrs = _listen_ports


def apply_all() -> None:
    """Apply every module-level workaround (idempotent)."""
    apply_dial_fix()
    close_dead_connections()
    punch_from_listen_ports()
    start_lookups_at_servers()
    keep_providers_with_stale_records()
    release_inbound_slots()
    muxer.apply_all()
