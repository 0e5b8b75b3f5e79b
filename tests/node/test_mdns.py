"""LAN discovery (lloom.node.mdns): in-process nodes on this machine's own interface.

Every test uses its own service name, so tests (and other processes on the machine) do
not see each other's nodes. mDNS multicast leaves through the interface of a concrete
non-loopback IPv4 address; the kernel loops it back to the other sockets on port 5353.
"""

from __future__ import annotations

import logging
import secrets
import socket
import threading
import time
import types
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import ifaddr
import libp2p.peer.peerdata
import pytest
import trio
from libp2p.discovery.events.peerDiscovery import peerDiscovery
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from multiaddr import Multiaddr
from zeroconf import ServiceInfo, Zeroconf
from zeroconf._dns import DNSPointer
from zeroconf._protocol.outgoing import DNSOutgoing
from zeroconf.const import _CLASS_IN, _FLAGS_AA, _FLAGS_QR_RESPONSE, _TYPE_PTR

from lloom.identity import Identity
from lloom.node import mdns
from lloom.node.mdns import (
    MAX_ADDRS,
    MAX_PROPERTIES,
    LanDiscovery,
    LanPeer,
    advertisable_addrs,
    check_properties,
    pack_list,
    parse_properties,
    zeroconf_threads,
)
from lloom.node.node import Node, NodeConfig, open_node

pytestmark = pytest.mark.timeout(60)


def _lan_ip() -> str | None:
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and not ip.ip.startswith(("127.", "169.254.")):
                return ip.ip
    return None


LAN_IP = _lan_ip() or ""
if not LAN_IP:
    pytest.skip("no non-loopback IPv4 interface for mDNS", allow_module_level=True)


def fresh_service() -> str:
    """A service name no other test or process uses."""
    return "t" + secrets.token_hex(4)


@asynccontextmanager
async def lan_nodes(
    count: int,
    service: str,
    properties: Sequence[Mapping[str, str]] | None = None,
    listen: str | None = None,
    **options: Any,
) -> AsyncIterator[list[tuple[Node, LanDiscovery]]]:
    """``count`` nodes, each running a started LanDiscovery on ``service``."""
    listen = listen or f"/ip4/{LAN_IP}/tcp/0"
    async with AsyncExitStack() as stack:
        nodes = [
            await stack.enter_async_context(
                open_node(Identity.generate(), NodeConfig(listen=[Multiaddr(listen)]))
            )
            for _ in range(count)
        ]
        nursery = await stack.enter_async_context(trio.open_nursery())
        stack.callback(nursery.cancel_scope.cancel)  # on exit: discovery stops, then nodes
        out: list[tuple[Node, LanDiscovery]] = []
        for i, node in enumerate(nodes):
            props = properties[i] if properties else None
            lan = LanDiscovery(node.host, service, props, **options)
            await nursery.start(lan.run)
            out.append((node, lan))
        yield out


async def wait_for_peers(lan: LanDiscovery, count: int, limit: float = 5.0) -> float:
    """Seconds until ``lan`` lists ``count`` peers."""
    start = trio.current_time()
    with trio.fail_after(limit):
        while len(lan.peers()) < count:
            await lan.wait_for_change()
    return trio.current_time() - start


def ids(lan: LanDiscovery) -> set[ID]:
    return {p.peer_id for p in lan.peers()}


async def test_three_nodes_find_each_other_with_properties() -> None:
    props = [{"role": "executor", "models": "a,b"}, {"role": "client"}, {}]
    async with lan_nodes(3, fresh_service(), props) as nodes:
        for node, lan in nodes:
            await wait_for_peers(lan, 2)
            others = {n.peer_id for n, _ in nodes} - {node.peer_id}
            assert ids(lan) == others
        (executor, _), (client, client_lan), _ = nodes
        found = await client_lan.wait_for_peer(lambda p: "b" in p.list_property("models"))
        assert found.peer_id == executor.peer_id
        assert dict(found.properties) == {"role": "executor", "models": "a,b"}
        assert {str(a) for a in found.addrs} == {
            str(a) for a in executor.host.get_transport_addrs()
        }
        peer = client_lan.get(nodes[2][0].peer_id)
        assert peer is not None and dict(peer.properties) == {}
        # The addresses reached the peerstore; nothing was dialled.
        assert set(client.host.get_peerstore().addrs(executor.peer_id)) >= set(found.addrs)
        assert not client.host.get_network().get_connections(executor.peer_id)
        await client.connect(PeerInfo(executor.peer_id, []))  # by PeerId alone
        assert await client.ping(executor.peer_id) < 1.0


async def test_wildcard_listener_advertises_dialable_addresses() -> None:
    """Workaround 1: a node listening on 0.0.0.0 is advertised by its interface
    addresses (py-libp2p advertised /ip4/0.0.0.0/..., which our listener rejects)."""
    service = fresh_service()
    async with (
        lan_nodes(1, service, listen="/ip4/0.0.0.0/tcp/0") as [(wild, wild_lan)],
        lan_nodes(1, service) as [(other, other_lan)],
    ):
        assert wild_lan.advertised_addrs
        assert all("0.0.0.0" not in str(a) for a in wild_lan.advertised_addrs)
        peer = await other_lan.wait_for_peer()
        assert peer.peer_id == wild.peer_id
        assert any(LAN_IP in str(a) for a in peer.addrs)
        await other.connect(peer.info)


async def test_start_does_not_block_trio_and_is_fast() -> None:
    """Workaround 2: start and stop run in a thread, registration skips probing, and the
    browser asks QM questions. py-libp2p's MDNSDiscovery.start held the trio thread ~1.6 s
    and a new node found the others only after ~1.1 s (its first question was QU)."""
    service = fresh_service()
    gaps: list[float] = []

    async def ticker() -> None:
        last = trio.current_time()
        while True:
            await trio.sleep(0.01)
            now = trio.current_time()
            gaps.append(now - last)
            last = now

    listen = NodeConfig(listen=[Multiaddr(f"/ip4/{LAN_IP}/tcp/0")])
    async with (
        open_node(Identity.generate(), listen) as a,
        open_node(Identity.generate(), listen) as b,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(ticker)
        a_lan, b_lan = LanDiscovery(a.host, service), LanDiscovery(b.host, service)
        start = trio.current_time()
        await nursery.start(a_lan.run)
        started = trio.current_time() - start
        await trio.sleep(1.2)  # A's announcements are over: B must ask
        seen: dict[str, float] = {}

        async def see(name: str, lan: LanDiscovery) -> None:
            seen[name] = await wait_for_peers(lan, 1)

        async with trio.open_nursery() as waiters:
            waiters.start_soon(see, "A sees B", a_lan)
            waiters.start_soon(see, "B sees A", b_lan)
            await nursery.start(b_lan.run)
        nursery.cancel_scope.cancel()
    assert started < 1.0, started
    assert max(seen.values()) < 0.8, seen
    assert max(gaps) < 0.3, max(gaps)


async def test_two_discoveries_in_one_process_keep_their_own_peers() -> None:
    """Workaround 3: each discovery hears only its own browser, in the trio thread; py-libp2p
    sent every node's discoveries to one process-wide handler list, from zeroconf's thread."""
    heard: list[PeerInfo] = []
    peerDiscovery.register_peer_discovered_handler(heard.append)
    threads: set[threading.Thread] = set()
    original = LanDiscovery._apply

    def apply(self: LanDiscovery, event: Any) -> None:
        threads.add(threading.current_thread())
        original(self, event)

    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(LanDiscovery, "_apply", apply)
            async with lan_nodes(2, fresh_service()) as [(a, a_lan), (b, b_lan)]:
                await wait_for_peers(a_lan, 1)
                await wait_for_peers(b_lan, 1)
                assert ids(a_lan) == {b.peer_id}
                assert ids(b_lan) == {a.peer_id}
    finally:
        peerDiscovery.unregister_peer_discovered_handler(heard.append)
    assert heard == []
    assert threads == {threading.current_thread()}


async def test_discovered_addresses_do_not_expire_in_the_peerstore(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Workaround 4: py-libp2p added them with a 120 s TTL, which (per peer) expired all of
    the peer's addresses two minutes later while it was still on the LAN."""
    async with lan_nodes(2, fresh_service()) as [(a, a_lan), (b, _)]:
        await wait_for_peers(a_lan, 1)
        later = time.time() + 3600
        monkeypatch.setattr(libp2p.peer.peerdata, "time", types.SimpleNamespace(time=lambda: later))
        assert a.host.get_peerstore().addrs(b.peer_id)  # raises "peer ID is expired"


async def test_a_peer_that_vanishes_without_goodbye_expires() -> None:
    """Workaround 5: records carry ``record_ttl`` (zeroconf's default for PTR/TXT was 75
    minutes); a silent peer drops out, a live one is kept by zeroconf's re-queries."""
    async with lan_nodes(3, fresh_service(), record_ttl=2) as nodes:
        (_, a_lan), (b, b_lan), (c, _) = nodes
        await wait_for_peers(a_lan, 2)
        zc = b_lan._zeroconf
        assert zc is not None
        zc.async_send = lambda *args, **kwargs: None  # type: ignore[method-assign]  # B goes mute
        start = trio.current_time()
        with trio.fail_after(25):
            while b.peer_id in ids(a_lan):
                await a_lan.wait_for_change()
        gone = trio.current_time() - start
        assert ids(a_lan) == {c.peer_id}  # kept alive by answers to the refresh queries
        await trio.sleep(3)
        assert ids(a_lan) == {c.peer_id}
    assert gone >= 1.5, gone


async def test_a_stopped_peer_disappears_but_keeps_its_other_addresses() -> None:
    """Workaround 6: the goodbye removes B from peers() (quickly), but not the addresses
    A knew from elsewhere (py-libp2p cleared every address of the peer)."""
    service = fresh_service()
    async with lan_nodes(1, service) as [(a, a_lan)]:
        dht_addr = Multiaddr("/ip4/198.51.100.7/tcp/4002")
        async with lan_nodes(1, service) as [(b, _)]:
            await wait_for_peers(a_lan, 1)
            a.host.get_peerstore().add_addrs(b.peer_id, [dht_addr], 0)
            left = trio.current_time()
        with trio.fail_after(5):
            while a_lan.peers():
                await a_lan.wait_for_change()
        assert trio.current_time() - left < 3
        assert dht_addr in a.host.get_peerstore().addrs(b.peer_id)
        assert a_lan.get(b.peer_id) is None


async def test_start_and_stop_are_clean(caplog: pytest.LogCaptureFixture) -> None:
    """Two zeroconf threads per discovery (workaround 7: no meta-query browser), none left
    after stop, and no warning or error logged on the way."""
    caplog.set_level(logging.DEBUG)
    before = set(zeroconf_threads())
    async with lan_nodes(2, fresh_service()) as [(_, a_lan), _b]:
        await wait_for_peers(a_lan, 1)
        during = set(zeroconf_threads()) - before
        assert len(during) == 4, [t.name for t in during]
    assert set(zeroconf_threads()) - before == set()  # joined before run() returned
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert noisy == [], [r.getMessage() for r in noisy]


def _announce_ptr_only(service_type: str, name: str) -> None:
    """Multicast a PTR record for ``name`` that no one will back with SRV/TXT."""
    out = DNSOutgoing(_FLAGS_QR_RESPONSE | _FLAGS_AA)
    out.add_answer_at_time(DNSPointer(service_type, _TYPE_PTR, _CLASS_IN, 120, name), 0)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(LAN_IP))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
        for packet in out.packets():
            sock.sendto(packet, ("224.0.0.251", 5353))


async def test_a_mute_service_does_not_stall_discovery_or_stop() -> None:
    """Workaround 8: a PTR without SRV/TXT held py-libp2p's browser thread for 18 s
    (three 5 s lookups with back-off), delaying the next discovery and stop; lookups now
    run side by side and stop cancels them."""
    service = fresh_service()
    async with lan_nodes(1, service) as [(_, a_lan)]:
        for i in range(2):
            _announce_ptr_only(a_lan.service_type, f"mute{i}.{a_lan.service_type}")
        await trio.sleep(0.2)  # the browser thread is now in the mute lookups
        async with lan_nodes(1, service) as [(b, _)]:
            await wait_for_peers(a_lan, 1, limit=1.5)
            assert ids(a_lan) == {b.peer_id}
        for i in range(2, 4):
            _announce_ptr_only(a_lan.service_type, f"mute{i}.{a_lan.service_type}")
        await trio.sleep(0.2)
        stopping = trio.current_time()
    assert trio.current_time() - stopping < 1


def _hostile_txt(peer: str) -> dict[bytes, bytes | None]:
    txt: dict[bytes, bytes | None] = {
        b"dnsaddr": f"/ip4/{LAN_IP}/tcp/4999/p2p/{peer}".encode(),
        b"dnsaddr2": f"/ip4/0.0.0.0/tcp/1/p2p/{peer}".encode(),
        b"dnsaddr3": b"not a multiaddr",
        b"dnsaddr4": f"/ip4/{LAN_IP}/udp/5/quic-v1/p2p/{peer}".encode(),
        b"dnsaddr5": f"/dns4/evil.example/tcp/5/p2p/{peer}".encode(),
        b"role": b"executor",
        b"Role": b"upper case key",
        b"bad key": b"x",
        b"models": b"\xff\xfe not utf-8",
        b"ctl": b"a\x00b",
        b"id": b"spoof",
        b"flag": None,
        b"big": b"x" * 240,
    }
    for i in range(6, 40):
        txt[f"dnsaddr{i}".encode()] = f"/ip4/10.0.0.{i}/tcp/{i}/p2p/{peer}".encode()
    for i in range(30):
        txt[f"k{i}".encode()] = b"v" * 100
    return txt


async def test_garbage_from_the_lan_is_ignored() -> None:
    """Hostile records: invalid keys and values, reserved keys, too many entries, no
    usable address, bad PeerIds. The node keeps the valid parts and keeps working."""
    service = fresh_service()
    async with lan_nodes(1, service) as [(_, a_lan)]:
        stype = a_lan.service_type
        fake = str(Identity.generate().peer_id)
        ip = [socket.inet_aton(LAN_IP)]  # zeroconf resolves a service only with an A record
        infos = [
            ServiceInfo(
                stype, f"hostile.{stype}", port=4999, properties=_hostile_txt(fake), addresses=ip
            ),
            ServiceInfo(
                stype, f"noaddr.{stype}", port=1, properties={b"dnsaddr": b"/p2p/x"}, addresses=ip
            ),
            ServiceInfo(
                stype,
                f"badid.{stype}",
                port=1,
                properties={b"dnsaddr": f"/ip4/{LAN_IP}/tcp/1/p2p/Qmnotapeer".encode()},
                addresses=ip,
            ),
            ServiceInfo(stype, f"empty.{stype}", port=1, properties={}, addresses=ip),
            ServiceInfo(
                stype,
                f"wildonly.{stype}",
                port=1,
                properties={b"dnsaddr": f"/ip4/0.0.0.0/tcp/1/p2p/{fake}".encode()},
                addresses=ip,
            ),
        ]

        def register() -> Zeroconf:
            zc = Zeroconf(interfaces=[LAN_IP])
            for info in infos:
                zc.register_service(info, cooperating_responders=True)
            return zc

        zc = await trio.to_thread.run_sync(register)
        try:
            peer = await wait_peer_or_fail(a_lan)
            await trio.sleep(1.0)  # the other records are processed too
            assert [p.peer_id for p in a_lan.lan_peers()] == [peer.peer_id]
            assert str(peer.peer_id) == fake
            assert len(peer.addrs) == MAX_ADDRS
            assert str(peer.addrs[0]) == f"/ip4/{LAN_IP}/tcp/4999"
            assert all("0.0.0.0" not in str(x) and "/tcp/" in str(x) for x in peer.addrs)
            props = dict(peer.properties)
            assert props["role"] == "executor"
            assert props["big"] == "x" * 240
            for bad in ("Role", "bad key", "models", "ctl", "id", "flag"):
                assert bad not in props
            assert len(props) <= MAX_PROPERTIES
            assert sum(len(k) + 1 + len(v) for k, v in props.items()) <= mdns.MAX_PROPERTIES_BYTES
        finally:
            await trio.to_thread.run_sync(zc.close)
        async with lan_nodes(1, service) as [(b, _)]:  # discovery still works
            await wait_peer_or_fail(a_lan, match=b.peer_id)


async def wait_peer_or_fail(
    lan: LanDiscovery, limit: float = 5.0, match: ID | None = None
) -> LanPeer:
    with trio.fail_after(limit):
        return await lan.wait_for_peer(lambda p: match is None or p.peer_id == match)


async def test_properties_can_change_while_running() -> None:
    async with lan_nodes(2, fresh_service(), [{"models": "a"}, {}]) as nodes:
        (executor, executor_lan), (_, client_lan) = nodes
        await wait_for_peers(client_lan, 1)
        await executor_lan.set_properties({"models": "a,c"})
        with trio.fail_after(5):
            peer = await client_lan.wait_for_peer(lambda p: "c" in p.list_property("models"))
        assert peer.peer_id == executor.peer_id


async def test_services_beyond_the_limit_are_ignored() -> None:
    service = fresh_service()
    async with (
        lan_nodes(1, service, max_services=1) as [(_, a_lan)],
        lan_nodes(2, service),
    ):
        await wait_for_peers(a_lan, 1)
        await trio.sleep(1.0)
        assert len(a_lan.peers()) == 1


async def test_invalid_own_properties_are_refused() -> None:
    """Workaround 9: a bad property is a ValueError up front (py-libp2p logged zeroconf's
    error and ran unadvertised)."""
    for bad in (
        {"models": "x" * 250},
        {"dnsaddr": "/ip4/1.2.3.4/tcp/1"},
        {"id": "x"},
        {"Role": "x"},
        {"k=": "x"},
        {"ctl": "a\nb"},
        {f"k{i}": "v" for i in range(MAX_PROPERTIES + 1)},
        {f"k{i}": "v" * 200 for i in range(6)},
    ):
        with pytest.raises(ValueError):
            check_properties(bad)
    async with open_node(Identity.generate(), NodeConfig()) as node:
        with pytest.raises(ValueError):
            LanDiscovery(node.host, "lloom", {"models": "x" * 300})
        with pytest.raises(ValueError):
            LanDiscovery(node.host, "not_a--name")


def test_pack_list_round_trips_long_lists() -> None:
    models = [f"org{i}/Some-Model-{i}B-Instruct" for i in range(20)]
    props = check_properties({"role": "executor", **pack_list("models", models)})
    assert len(props) > 2
    wire = {k.encode(): v.encode() for k, v in props.items()}
    peer = LanPeer(ID(b"x"), (), parse_properties(wire))
    assert peer.list_property("models") == models
    assert LanPeer(ID(b"x"), (), {"models": "a,,b"}).list_property("models") == ["a", "b"]
    assert parse_properties({b"ok": b"1", b"\xff": b"2", b"n": None}) == {"ok": "1"}


def test_advertised_addresses_prefer_interfaces_over_loopback() -> None:
    lan = Multiaddr(f"/ip4/{LAN_IP}/tcp/4002")
    loop = Multiaddr("/ip4/127.0.0.1/tcp/4002")
    assert advertisable_addrs([loop, lan]) == [lan]
    assert advertisable_addrs([loop]) == [loop]
    wild = advertisable_addrs([Multiaddr("/ip4/0.0.0.0/tcp/4002")])
    assert lan in wild and loop not in wild
    assert advertisable_addrs([Multiaddr("/ip4/1.2.3.4/udp/1/quic-v1")]) == []


async def test_a_loopback_node_is_found_on_this_machine_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A node listening on 127.0.0.1 only (NodeConfig's default) is still advertised, for
    nodes on the same machine, and says that other machines cannot dial it."""
    service = fresh_service()
    async with (
        lan_nodes(1, service, listen="/ip4/127.0.0.1/tcp/0") as [(loop, _)],
        lan_nodes(1, service) as [(other, other_lan)],
    ):
        peer = await wait_peer_or_fail(other_lan)
        assert peer.peer_id == loop.peer_id
        assert [str(a) for a in peer.addrs] == [str(a) for a in loop.host.get_transport_addrs()]
        await other.connect(peer.info)
    assert any("only loopback" in r.getMessage() for r in caplog.records)
