"""LAN discovery over mDNS, without validators: :class:`LanDiscovery`.

Built on py-libp2p 0.8.1's own mDNS pieces (``libp2p.discovery.mdns``): its
``PeerBroadcaster`` writes the TXT record (``dnsaddr=/ip4/…/tcp/…/p2p/<PeerId>``, one
key per address) and registers it with zeroconf; its ``PeerListener`` browses, fetches a
service's records and parses and validates the PeerId and addresses. Its ``MDNSDiscovery``
(what ``new_host(enable_mDNS=True)`` runs) is not used: it blocks trio on start and stop,
reports to a process-wide handler list and runs its cleanup loop as a trio system task
(workarounds 2-4 below); :class:`LanDiscovery` puts the two pieces together itself. Usage::

    lan = LanDiscovery(node.host, properties={"role": "executor", "models": "a,b"})
    async with trio.open_nursery() as nursery:
        await nursery.start(lan.run)           # advertised once this returns
        peer = await lan.wait_for_peer(lambda p: "a" in p.list_property("models"))
        await node.connect(peer.info)          # dial it yourself: nothing connects by itself

Service type ``_p2p-<service_name>._udp.local.`` (py-libp2p's "private network" form, so
IPFS and other libp2p apps on the LAN stay out; ``service_name=None`` gives the standard
``_p2p._udp.local.``). The record carries free-form properties next to the addresses
(:data:`MAX_PROPERTIES` entries, each ``key=value`` at most 255 bytes, at most
:data:`MAX_PROPERTIES_BYTES` together); what a LAN peer sends is bounded and validated
(:func:`parse_properties`, :data:`MAX_ADDRS`, :data:`MAX_SERVICES`) and never raises;
that pure part lives in :mod:`lloom.node.lanrecord`. Properties and addresses are
unauthenticated hints: a dial proves the PeerId (Noise), not that the peer serves what it
claims.

Cost: two threads per instance (zeroconf's event loop and one ``ServiceBrowser``), one UDP
socket on port 5353 per interface. Traffic: the browser's queries back off to one per PTR
refresh; each listed peer is asked again about once per ``record_ttl`` (workaround 5).
``run`` returns only after both threads have been joined.

Workarounds for py-libp2p 0.8.1 (each has a test in ``tests/node/test_mdns.py``):

1. The broadcaster advertises raw listen addresses: ``/ip4/0.0.0.0/…`` for a node that
   listens on all interfaces (field notes, defect 12). We give it the concrete interface
   addresses (``expand_addrs``; loopback only when there is nothing else).
   *test_wildcard_listener_advertises_dialable_addresses*
2. ``MDNSDiscovery.start``/``stop`` do blocking zeroconf calls on the trio thread: start
   stalls the event loop ~1.6 s (name probing), stop ~0.25 s. Zeroconf is started and
   stopped in ``trio.to_thread``; the service name (63 random characters, as py-libp2p
   makes it) is registered without probing (``cooperating_responders``); and the browser
   asks QM questions: its first question was QU, whose unicast answer reaches only one
   of the zeroconf sockets sharing port 5353 on a machine, so a new node found those
   already running only after ~1.1 s; now ~0.15 s. *test_start_does_not_block_trio_and_is_fast*
3. Discoveries go to a process-wide singleton (``peerDiscovery``): with two nodes in one
   process each node's handler hears the other's discoveries, and the handler runs on
   zeroconf's browser thread. Our listener hands each event to trio
   (``TrioToken.run_sync_soon``); state and peerstore are only touched there.
   *test_two_discoveries_in_one_process_keep_their_own_peers*
4. Peer addresses were added to the peerstore with a 120 s TTL — py-libp2p's TTL is per
   peer, so after 120 s *all* of the peer's addresses (DHT ones too) expire and
   ``peerstore.addrs`` raises — and the cleanup loop (a system task outside any nursery)
   forgets peers still on the LAN after 240 s, because zeroconf reports no update for an
   unchanged, refreshed record. We add addresses without TTL while the peer is present,
   do not run the cleanup loop, and rely on zeroconf's goodbye/expiry (next item).
   *test_discovered_addresses_do_not_expire_in_the_peerstore*
5. A peer that vanished without a goodbye (crash, cable) stayed listed 75 minutes: the
   PTR and TXT records carry zeroconf's default TTL of 4,500 s, and zeroconf keeps any PTR
   at least 1,125 s (``_DNS_PTR_MIN_TTL``) whatever the sender says. Our records carry
   ``record_ttl`` (120 s), and every ``record_ttl / 4`` s each listed service is looked up
   again: from the cache while its SRV/TXT records are fresh, else by asking the LAN; one
   that does not answer within 2.5 s is dropped — within ~``record_ttl`` + 35 s of going
   silent (if it speaks again, zeroconf reports it as updated and it is listed again).
   *test_a_peer_that_vanishes_without_goodbye_expires*
6. A removed service cleared *every* address of that peer from the peerstore
   (``clear_addrs``), DHT-learned ones included. We leave the peerstore alone on removal
   (a stale LAN address costs one failed dial) and drop the peer from :meth:`peers`.
   *test_a_stopped_peer_disappears_but_keeps_its_other_addresses*
7. The listener also browses ``_services._dns-sd._udp.local.`` (every service type on the
   LAN, kept in an unbounded dict, one more thread); ours browses only our service type.
   *test_start_and_stop_are_clean*
8. A service that is announced but never answers (PTR only) held the browser thread
   5 + 1 + 5 + 2 + 5 s (three 5 s lookups with back-off), delaying every other discovery
   and ``stop``. Lookups run concurrently in zeroconf's event loop instead (two 1.5 s
   attempts, at most :data:`MAX_PENDING_LOOKUPS` at once); ``stop`` cancels them.
   *test_a_mute_service_does_not_stall_discovery_or_stop*
9. Registration errors were logged and swallowed (a node believed it was advertised); a
   TXT entry over 255 bytes made zeroconf raise inside that. Properties are validated up
   front (``ValueError``) and registration errors propagate out of :meth:`run`.
   *test_invalid_own_properties_are_refused*
10. The listener's PeerId check accepts any base58 text (``x``, ``Qmnotapeer``). A PeerId
    must be a sha2-256 multihash or an identity multihash of a public key.
    *test_garbage_from_the_lan_is_ignored*

Not worked around: the addresses are in ``dnsaddr``, ``dnsaddr2``, … keys, while go- and
js-libp2p repeat ``dnsaddr=`` (zeroconf keeps only the first of repeated keys), so only the
first address of such peers is seen — they are not on our service type anyway.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import trio
from libp2p.abc import IHost
from libp2p.discovery.mdns.broadcaster import PeerBroadcaster
from libp2p.discovery.mdns.listener import PeerListener
from libp2p.discovery.mdns.utils import stringGen
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from multiaddr import Multiaddr
from zeroconf import DNSQuestionType, ServiceBrowser, Zeroconf

from lloom.node.lanrecord import (
    MAX_ADDRS,
    MAX_ENTRY_BYTES,
    MAX_PROPERTIES,
    MAX_PROPERTIES_BYTES,
    MAX_SERVICES,
    LanPeer,
    advertisable_addrs,
    check_properties,
    dialable,
    is_loopback,
    pack_list,
    parse_properties,
    service_type,
    valid_peer_id,
)

__all__ = [
    "MAX_ADDRS",
    "MAX_ENTRY_BYTES",
    "MAX_PROPERTIES",
    "MAX_PROPERTIES_BYTES",
    "MAX_SERVICES",
    "LanDiscovery",
    "LanPeer",
    "advertisable_addrs",
    "check_properties",
    "pack_list",
    "parse_properties",
    "service_type",
    "zeroconf_threads",
]

logger = logging.getLogger(__name__)

#: Default TTL of the advertised records, seconds (zeroconf's default host TTL).
DEFAULT_RECORD_TTL = 120
#: One lookup of a newly seen service, milliseconds.
LOOKUP_TIMEOUT_MS = 1500
LOOKUP_ATTEMPTS = 2
#: Lookups of newly seen services in flight at once; more announcements wait for the next.
MAX_PENDING_LOOKUPS = 64
#: How long a listed service has to answer a re-check, milliseconds.
RECHECK_TIMEOUT_MS = 2500


@dataclass(frozen=True)
class _Removed:
    service: str


@dataclass(frozen=True)
class _Seen:
    service: str
    peer: LanPeer


class _Broadcaster(PeerBroadcaster):
    """py-libp2p's broadcaster with our properties, TTL, and registration that raises."""

    def __init__(
        self,
        *,
        zeroconf: Zeroconf,
        service_type: str,
        service_name: str,
        peer_id: str,
        addrs: list[str],
        properties: dict[str, str],
        ttl: int,
    ) -> None:
        self.extra_properties = properties
        self.record_ttl = ttl
        port = int(Multiaddr(addrs[0]).value_for_protocol("tcp"))
        super().__init__(
            zeroconf=zeroconf,
            service_type=service_type,
            service_name=service_name,
            peer_id=peer_id,
            port=port,
            listen_addrs=addrs,
            host=None,
        )

    def _build_service_info(self, resolved_addrs: list[str] | None = None) -> None:
        super()._build_service_info(resolved_addrs)
        assert self.service_info is not None
        self.service_info.host_ttl = self.record_ttl
        self.service_info.other_ttl = self.record_ttl

    def _build_txt_properties(
        self,
        listen_addrs: list[str] | None,
        local_ips: list[str],
        port: int,
        peer_id: str,
    ) -> dict[bytes, bytes]:
        txt = super()._build_txt_properties(listen_addrs, local_ips, port, peer_id)
        for key, value in self.extra_properties.items():
            txt[key.encode()] = value.encode()
        return txt

    def register(self) -> None:
        """Register without name probing (the name is 63 random characters); raise on
        failure instead of logging."""
        assert self.service_info is not None
        self.zeroconf.register_service(self.service_info, cooperating_responders=True)

    def update(self) -> None:
        """Re-announce the record after :attr:`extra_properties` changed."""
        self._build_service_info()
        assert self.service_info is not None
        self.zeroconf.update_service(self.service_info)


class _Listener(PeerListener):
    """py-libp2p's listener (its TXT parsing and PeerId check) whose events go to
    ``deliver`` instead of the process-wide ``peerDiscovery`` and the peerstore. Callbacks
    run on zeroconf's browser thread, lookups in zeroconf's event loop."""

    def __init__(
        self,
        *,
        zeroconf: Zeroconf,
        service_type: str,
        service_name: str,
        own_peer: ID,
        deliver: Callable[[_Seen | _Removed], None],
    ) -> None:
        # Not PeerListener.__init__: it also browses the meta-query type (workaround 7)
        # and asks its first question as QU, whose unicast answer reaches only one of
        # several zeroconf sockets sharing port 5353 on one machine; QM is answered by
        # multicast, so co-located nodes find each other at once instead of after ~1 s.
        self.deliver = deliver
        self.own_peer = own_peer
        self.closing = False
        self.pending: set[concurrent.futures.Future[None]] = set()
        self.zeroconf = zeroconf
        self.service_type = service_type
        self.service_name = service_name
        self.browser = ServiceBrowser(
            zeroconf, service_type, listener=self, question_type=DNSQuestionType.QM
        )

    def add_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        """A service appeared."""
        self._seen(zc, type_, name)

    def update_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        """A service's records changed."""
        self._seen(zc, type_, name)

    def remove_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        """A service said goodbye or expired."""
        if type_ == self.service_type and name != self.service_name:
            self.deliver(_Removed(name))

    def stop(self) -> None:
        """Stop browsing (joins the browser thread) and cancel pending lookups."""
        self.closing = True
        self.browser.cancel()
        for future in list(self.pending):
            future.cancel()

    def _seen(self, zc: Zeroconf, type_: str, name: str) -> None:
        """On the browser thread: start a lookup in zeroconf's loop, do not wait for it."""
        if self.closing or type_ != self.service_type or name == self.service_name:
            return
        if len(self.pending) >= MAX_PENDING_LOOKUPS or zc.loop is None:
            logger.debug("mDNS: too many lookups in flight, skipping %s for now", name)
            return
        future = asyncio.run_coroutine_threadsafe(self._lookup(zc, type_, name), zc.loop)
        self.pending.add(future)
        future.add_done_callback(self.pending.discard)

    async def _lookup(self, zc: Zeroconf, type_: str, name: str) -> None:
        """In zeroconf's loop: fetch the service's records, parse, deliver."""
        try:
            for _ in range(LOOKUP_ATTEMPTS):  # workaround 8
                info = await zc.async_get_service_info(type_, name, LOOKUP_TIMEOUT_MS)
                if info is not None:
                    break
            else:
                return
            if self.closing:
                return
            found = self._extract_peer_info(info)
            if found is None or found.peer_id == self.own_peer:
                return
            if not valid_peer_id(found.peer_id):  # workaround 10
                return
            addrs = tuple(a for a in found.addrs if dialable(a))[:MAX_ADDRS]
            if not addrs:
                return
            props = types.MappingProxyType(parse_properties(info.properties))
            peer = LanPeer(found.peer_id, addrs, props, time.monotonic())
            self.deliver(_Seen(name, peer))
        except Exception:  # never let a LAN peer break zeroconf's loop
            logger.debug("ignoring mDNS service %s", name, exc_info=True)


class LanDiscovery:
    """Advertise a host on the LAN and learn the peers that do the same.

    ``properties`` are advertised next to the addresses (see :func:`check_properties`);
    ``service_name`` separates networks (``_p2p-<name>._udp.local.``); ``addrs``
    overrides the advertised addresses (default: the host's listen addresses,
    wildcards expanded). Discovered peers' addresses are added to the host's peerstore;
    nothing is dialled. All methods are for the trio thread that runs :meth:`run`.
    """

    def __init__(
        self,
        host: IHost,
        service_name: str | None = "lloom",
        properties: Mapping[str, str] | None = None,
        *,
        addrs: Sequence[Multiaddr] | None = None,
        record_ttl: int = DEFAULT_RECORD_TTL,
        max_services: int = MAX_SERVICES,
    ) -> None:
        if record_ttl < 1:
            raise ValueError("record_ttl must be at least 1 s")
        self.host = host
        self.service_type = service_type(service_name)
        self._properties = check_properties(properties or {})
        self._addrs = list(addrs) if addrs is not None else None
        self._record_ttl = record_ttl
        self._max_services = max_services
        self._services: dict[str, LanPeer] = {}
        self._changed = trio.Event()
        self._running = False
        self._used = False
        self._token: trio.lowlevel.TrioToken | None = None
        self._zeroconf: Zeroconf | None = None
        self._broadcaster: _Broadcaster | None = None
        self._listener: _Listener | None = None
        self._registered = False
        self._advertised: list[Multiaddr] = []
        self._dropped = 0

    # ---- public API -------------------------------------------------------------------

    @property
    def advertised_addrs(self) -> list[Multiaddr]:
        """The addresses in our record (set once :meth:`run` has started)."""
        return list(self._advertised)

    @property
    def properties(self) -> dict[str, str]:
        """The properties we advertise."""
        return dict(self._properties)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Advertise and browse until cancelled; ``task_status.started()`` once our
        record is registered. Stopping sends a goodbye and joins zeroconf's threads.

        Raises :class:`RuntimeError` if run twice or with no address to advertise, and
        zeroconf's errors (e.g. no usable interface).
        """
        if self._used:
            raise RuntimeError("LanDiscovery.run can be called once")
        self._used = True
        listen = self._addrs if self._addrs is not None else self.host.get_transport_addrs()
        self._advertised = advertisable_addrs(listen)
        if not self._advertised:
            raise RuntimeError(f"no dialable address to advertise on the LAN (listen: {listen})")
        if all(is_loopback(a) for a in self._advertised):
            logger.warning(
                "mDNS: only loopback addresses to advertise (%s); other machines cannot "
                "dial this node - listen on an interface address or 0.0.0.0",
                ", ".join(str(a) for a in self._advertised),
            )
        self._token = trio.lowlevel.current_trio_token()
        self._running = True
        try:
            # Not abandoned on cancel: a cancelled start finishes, then stops below.
            await trio.to_thread.run_sync(self._start_sync)
            logger.info(
                "mDNS: advertising %s on %s",
                ", ".join(str(a) for a in self._advertised),
                self.service_type,
            )
            task_status.started()
            interval = max(1.0, self._record_ttl / 4)
            while True:
                await trio.sleep(interval)
                await self._recheck()
        finally:
            self._running = False
            self._services.clear()
            self._wake()
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._stop_sync)

    def lan_peers(self) -> list[LanPeer]:
        """The peers currently on the LAN, one per PeerId (addresses of all its records
        united, properties of its latest one)."""
        merged: dict[ID, LanPeer] = {}
        for record in sorted(self._services.values(), key=lambda p: p.seen):
            old = merged.get(record.peer_id)
            if old is not None:
                addrs = old.addrs + tuple(a for a in record.addrs if a not in old.addrs)
                record = LanPeer(  # noqa: PLW2901 - the merged view of this PeerId
                    record.peer_id, addrs[:MAX_ADDRS], record.properties, record.seen
                )
            merged[record.peer_id] = record
        return list(merged.values())

    def peers(self) -> list[PeerInfo]:
        """The peers currently on the LAN, as :class:`PeerInfo` with their addresses."""
        return [p.info for p in self.lan_peers()]

    def get(self, peer_id: ID) -> LanPeer | None:
        """The LAN peer ``peer_id``, if it is on the LAN."""
        for peer in self.lan_peers():
            if peer.peer_id == peer_id:
                return peer
        return None

    async def wait_for_peer(self, match: Callable[[LanPeer], bool] | None = None) -> LanPeer:
        """The first LAN peer (already known or yet to come) for which ``match`` is true
        (any peer when None). Wrap it in ``trio.move_on_after`` / ``fail_after``."""
        while True:
            for peer in self.lan_peers():
                if match is None or match(peer):
                    return peer
            await self.wait_for_change()

    async def wait_for_change(self) -> None:
        """Return when a peer appears, changes or leaves (or discovery stops)."""
        await self._changed.wait()

    async def set_properties(self, properties: Mapping[str, str]) -> None:
        """Replace the advertised properties (e.g. when the served models change) and
        announce the new record. Raises :class:`ValueError` for invalid properties."""
        checked = check_properties(properties)
        self._properties = checked
        broadcaster = self._broadcaster
        if broadcaster is not None and self._running:
            broadcaster.extra_properties = checked
            await trio.to_thread.run_sync(broadcaster.update)

    # ---- zeroconf side (worker threads) ------------------------------------------------

    def _start_sync(self) -> None:
        zeroconf = Zeroconf()
        self._zeroconf = zeroconf
        name = f"{stringGen(63)}.{self.service_type}"
        self._broadcaster = _Broadcaster(
            zeroconf=zeroconf,
            service_type=self.service_type,
            service_name=name,
            peer_id=str(self.host.get_id()),
            addrs=[str(a) for a in self._advertised],
            properties=self._properties,
            ttl=self._record_ttl,
        )
        self._listener = _Listener(
            zeroconf=zeroconf,
            service_type=self.service_type,
            service_name=name,
            own_peer=self.host.get_id(),
            deliver=self._deliver,
        )
        self._broadcaster.register()
        self._registered = True

    def _stop_sync(self) -> None:
        """Stop browsing, say goodbye, close zeroconf; each step even if one failed."""
        steps: list[Callable[[], None]] = []
        if self._listener is not None:
            steps.append(self._listener.stop)
        if self._registered and self._broadcaster is not None and self._zeroconf is not None:
            zeroconf, info = self._zeroconf, self._broadcaster.service_info
            if info is not None:
                steps.append(lambda: zeroconf.unregister_service(info))
        if self._zeroconf is not None:
            steps.append(self._zeroconf.close)
        for step in steps:
            try:
                step()
            except Exception:  # keep closing the rest
                logger.warning("mDNS: error while stopping", exc_info=True)
        self._listener = self._broadcaster = self._zeroconf = None
        self._registered = False

    def _deliver(self, event: _Seen | _Removed) -> None:
        """Browser thread → trio thread."""
        token = self._token
        if token is None:
            return
        with contextlib.suppress(trio.RunFinishedError):  # trio has ended: nobody to tell
            token.run_sync_soon(self._apply, event)

    # ---- trio side ----------------------------------------------------------------------

    def _apply(self, event: _Seen | _Removed) -> None:
        """Runs in trio (``run_sync_soon``): must not raise."""
        try:
            if not self._running:
                return
            if isinstance(event, _Removed):
                if self._services.pop(event.service, None) is not None:
                    self._wake()
                return
            if event.service not in self._services and len(self._services) >= self._max_services:
                self._dropped += 1
                if self._dropped == 1 or self._dropped % 100 == 0:
                    logger.warning(
                        "mDNS: %d services on the LAN, ignoring more (%d so far)",
                        self._max_services,
                        self._dropped,
                    )
                return
            peer = event.peer
            # TTL 0 = no expiry (workaround 4); removal does not clear (workaround 6).
            self.host.get_peerstore().add_addrs(peer.peer_id, list(peer.addrs), 0)
            self._services[event.service] = peer
            self._wake()
        except Exception:
            logger.warning("mDNS: could not apply %r", event, exc_info=True)

    async def _recheck(self) -> None:
        """Drop listed services that no longer answer (workaround 5). The lookups run
        concurrently in zeroconf's event loop; cached records answer at once."""
        zeroconf = self._zeroconf
        names = list(self._services)
        if zeroconf is None or zeroconf.loop is None or not names:
            return
        checked_at = time.monotonic()

        async def missing() -> list[str]:
            results = await asyncio.gather(
                *(
                    zeroconf.async_get_service_info(self.service_type, n, RECHECK_TIMEOUT_MS)
                    for n in names
                ),
                return_exceptions=True,
            )
            return [n for n, r in zip(names, results, strict=True) if r is None]

        future = asyncio.run_coroutine_threadsafe(missing(), zeroconf.loop)
        done = trio.Event()
        token = trio.lowlevel.current_trio_token()

        def wake(_: object) -> None:  # on zeroconf's loop thread (or here, if already done)
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

        future.add_done_callback(wake)
        try:
            await done.wait()
        finally:
            future.cancel()
        if future.cancelled() or future.exception() is not None:
            return
        for name in future.result():
            peer = self._services.get(name)
            if peer is not None and peer.seen <= checked_at:
                logger.info("mDNS: %s no longer answers", peer.peer_id)
                del self._services[name]
                self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()


def zeroconf_threads() -> list[threading.Thread]:
    """Threads zeroconf runs in this process (its event loops and browsers); for tests
    and diagnostics."""
    return [
        t for t in threading.enumerate() if t.name.startswith("zeroconf-") or "_run_loop" in t.name
    ]
