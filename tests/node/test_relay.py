"""Circuit relay v2 as lloom wires it: validators relay, private nodes reserve, clients dial
circuits; each py-libp2p 0.8.1 workaround of :mod:`lloom.node.relay` and
:mod:`lloom.node.reach` with a test that fails without it."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as CircuitPeerId
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg
from multiaddr import Multiaddr

from lloom.dhtkeys import model_key
from lloom.errors import DialError, NetworkError
from lloom.identity import Identity
from lloom.node.node import Node, NodeConfig, open_node
from lloom.node.reach import MAX_DIAL_BACKS, Reachability, check_reachability
from lloom.node.relay import HOP_PROTOCOL_ID, RelaySettings, is_circuit, parse_circuit

pytestmark = pytest.mark.timeout(60)

ECHO = TProtocol("/lloom-test/echo/1")


async def _echo(stream: INetStream) -> None:
    try:
        while data := await stream.read(65536):
            await stream.write(data)
    except Exception:
        pass
    finally:
        await stream.close()


async def _roundtrip(node: Node, peer: ID, payload: bytes = b"ping") -> bytes:
    stream = await node.host.new_stream(peer, [ECHO])
    try:
        await stream.write(payload)
        got = b""
        with trio.fail_after(5):
            while len(got) < len(payload):
                got += await stream.read(len(payload) - len(got))
        return got
    finally:
        await stream.close()


async def until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``check`` under a deadline: for state of another node with no event to await."""
    with trio.fail_after(timeout):
        while not check():  # noqa: ASYNC110 - the state belongs to py-libp2p, no event
            await trio.sleep(0.05)


@asynccontextmanager
async def relayed_network(
    relay: RelaySettings | None = None, validators: int = 1
) -> AsyncIterator[tuple[list[Node], Node, trio.Nursery]]:
    """Validators that relay, and a private executor-like node reserved on them."""
    async with AsyncExitStack() as stack:
        vals: list[Node] = []
        for _ in range(validators):
            boot = [Multiaddr(v.listen_multiaddrs()[0]) for v in vals]
            vals.append(
                await stack.enter_async_context(
                    open_node(
                        Identity.generate(),
                        NodeConfig(dht_server=True, relay=relay or RelaySettings(), bootstrap=boot),
                    )
                )
            )
        boot = [Multiaddr(v.listen_multiaddrs()[0]) for v in vals]
        private = await stack.enter_async_context(
            open_node(Identity.generate(), NodeConfig(bootstrap=boot, reachability="private"))
        )
        private.host.set_stream_handler(ECHO, _echo)
        nursery = await stack.enter_async_context(trio.open_nursery())
        assert await private.make_reachable(nursery) == "relayed"
        yield vals, private, nursery
        nursery.cancel_scope.cancel()


async def _client(stack: AsyncExitStack, validators: list[Node]) -> Node:
    boot = [Multiaddr(v.listen_multiaddrs()[0]) for v in validators]
    return await stack.enter_async_context(
        open_node(Identity.generate(), NodeConfig(bootstrap=boot))
    )


async def test_private_node_advertises_only_relayed_addresses_and_is_reached_through_them() -> None:
    async with relayed_network() as ((validator,), private, _n), AsyncExitStack() as stack:
        addrs = private.listen_multiaddrs()
        assert addrs and all(is_circuit(a) for a in addrs), addrs
        relay, target = parse_circuit(addrs[0])
        assert relay.peer_id == validator.peer_id and target == private.peer_id
        # The full circuit survives BasicHost (it used to be cut at the first /p2p/).
        assert addrs[0].endswith(f"/p2p/{validator.peer_id}/p2p-circuit/p2p/{private.peer_id}")
        client = await _client(stack, [validator])
        await client.connect(PeerInfo(private.peer_id, [Multiaddr(addrs[0])]))
        assert client.path_to(private.peer_id) == "relayed"
        assert await _roundtrip(client, private.peer_id) == b"ping"


async def test_provider_records_carry_the_relayed_address_and_a_client_dials_it() -> None:
    key = model_key("relay-test")
    async with relayed_network() as ((validator,), private, _n), AsyncExitStack() as stack:
        assert await private.dht.provide(key)
        client = await _client(stack, [validator])
        found = await client.dht.find_providers(key)
        assert [p.peer_id for p in found] == [private.peer_id]
        assert any(is_circuit(a) for a in found[0].addrs), found[0].addrs
        await client.connect(found[0])
        assert await _roundtrip(client, private.peer_id, b"hello") == b"hello"


async def test_two_clients_circuits_to_one_node_end_independently() -> None:
    """py-libp2p kept one circuit per destination: when the executor side of one client's
    circuit ended, the relay closed the other client's circuit; and when a client went,
    the executor's side of its circuit was never closed."""
    async with relayed_network() as ((validator,), private, _n), AsyncExitStack() as stack:
        addr = Multiaddr(private.listen_multiaddrs()[0])
        first, second, third = [await _client(stack, [validator]) for _ in range(3)]
        for client in (first, second, third):
            await client.connect(PeerInfo(private.peer_id, [addr]))
            assert await _roundtrip(client, private.peer_id) == b"ping"
        stats = validator.relay_protocol.stats  # type: ignore[attr-defined]
        assert stats.circuits_active == 3
        await private.host.get_network().close_peer(first.peer_id)
        # Until the relay is done with the first circuit.
        await until(lambda: stats.circuits_active == 2)
        for client in (second, third):
            assert await _roundtrip(client, private.peer_id, b"still") == b"still"
        await third.host.get_network().close_peer(private.peer_id)
        await until(lambda: private.path_to(third.peer_id) is None)
        assert await _roundtrip(second, private.peer_id, b"again") == b"again"


async def test_reservation_is_quiet_and_takes_no_half_second(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """py-libp2p's HOP handler looped on the reservation's stream: an ERROR and a 0.5 s
    sleep per reservation."""
    caplog.set_level(logging.WARNING)
    async with relayed_network() as ((_validator,), private, _n):
        assert private.reservations is not None
        start = trio.current_time()
        renewed = await private.reservations._reserve(private.validator_infos()[0])
        assert renewed is not None
        assert trio.current_time() - start < 0.3
        await trio.sleep(0.6)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


@pytest.mark.parametrize(
    ("settings", "limit"),
    [
        (RelaySettings(max_reservations=1), "reservations"),
        (RelaySettings(max_reservations_per_ip=1), "reservations_per_ip"),
    ],
)
async def test_reservation_limits_refuse_and_count(settings: RelaySettings, limit: str) -> None:
    async with relayed_network(settings) as ((validator,), _private, _n), AsyncExitStack() as st:
        other = await st.enter_async_context(
            open_node(
                Identity.generate(),
                NodeConfig(
                    bootstrap=[Multiaddr(validator.listen_multiaddrs()[0])],
                    reachability="private",
                ),
            )
        )
        async with trio.open_nursery() as nursery:
            with pytest.raises(NetworkError, match="no validator accepted a relay reservation"):
                await other.make_reachable(nursery)
        stats = validator.relay_protocol.stats  # type: ignore[attr-defined]
        assert stats.reservations_refused == 1
        assert stats.refusals == {limit: 1}


async def test_private_node_reserves_on_two_validators_and_re_reserves_when_one_goes() -> None:
    async with AsyncExitStack() as stack:
        v1 = await stack.enter_async_context(
            open_node(Identity.generate(), NodeConfig(dht_server=True, relay=RelaySettings()))
        )
        v1addr = Multiaddr(v1.listen_multiaddrs()[0])
        v2 = await stack.enter_async_context(
            open_node(
                Identity.generate(),
                NodeConfig(dht_server=True, relay=RelaySettings(), bootstrap=[v1addr]),
            )
        )
        holder = await stack.enter_async_context(trio.open_nursery())
        stop_v3 = trio.Event()

        async def run_v3(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            config = NodeConfig(dht_server=True, relay=RelaySettings(), bootstrap=[v1addr])
            async with open_node(Identity.generate(), config) as v3:
                task_status.started(v3)
                await stop_v3.wait()

        v3: Node = await holder.start(run_v3)
        boot = [Multiaddr(v.listen_multiaddrs()[0]) for v in (v3, v1, v2)]
        private = await stack.enter_async_context(
            open_node(
                Identity.generate(),
                NodeConfig(bootstrap=boot, reachability="private", bootstrap_interval=0.5),
            )
        )
        nursery = await stack.enter_async_context(trio.open_nursery())
        await private.make_reachable(nursery)
        assert private.reservations is not None
        assert set(private.reservations.relays()) == {v3.peer_id, v1.peer_id}
        changed = private.addrs_changed
        stop_v3.set()
        with trio.fail_after(10):
            await changed.wait()
        assert set(private.reservations.relays()) == {v1.peer_id, v2.peer_id}
        assert len(private.listen_multiaddrs()) == 2
        nursery.cancel_scope.cancel()
        holder.cancel_scope.cancel()


async def test_autonat_dial_back_is_honest() -> None:
    """py-libp2p's AutoNAT server vouched for any address: it 'dialled back' over the
    request's own connection. A port where nothing listens is now refused."""
    async with AsyncExitStack() as stack:
        validator = await stack.enter_async_context(
            open_node(Identity.generate(), NodeConfig(dht_server=True, relay=RelaySettings()))
        )
        node = await _client(stack, [validator])
        real = node.host.get_transport_addrs()
        assert await check_reachability(node.host, [validator.peer_id], real) is (
            Reachability.PUBLIC
        )
        nobody = [Multiaddr("/ip4/127.0.0.1/tcp/1")]
        assert await check_reachability(node.host, [validator.peer_id], nobody) is (
            Reachability.PRIVATE
        )
        # A stranger's long list costs the validator at most MAX_DIAL_BACKS dials.
        many = [Multiaddr(f"/ip4/127.0.0.1/tcp/{port}") for port in range(1, 1 + MAX_DIAL_BACKS)]
        assert await check_reachability(node.host, [validator.peer_id], many + real) is (
            Reachability.PRIVATE
        )
        # A validator without AutoNAT gives no verdict.
        plain = await stack.enter_async_context(
            open_node(Identity.generate(), NodeConfig(bootstrap=[]))
        )
        await node.connect(PeerInfo(plain.peer_id, plain.host.get_transport_addrs()))
        assert await check_reachability(node.host, [plain.peer_id], real) is Reachability.UNKNOWN


async def test_auto_reachability_on_loopback_is_direct() -> None:
    async with AsyncExitStack() as stack:
        validator = await stack.enter_async_context(
            open_node(Identity.generate(), NodeConfig(dht_server=True, relay=RelaySettings()))
        )
        node = await _client(stack, [validator])
        async with trio.open_nursery() as nursery:
            assert await node.make_reachable(nursery) == "direct"
        assert not any(is_circuit(a) for a in node.listen_multiaddrs())


@pytest.mark.parametrize(
    "bad",
    [
        "/ip4/127.0.0.1/tcp/1/p2p-circuit",
        "/p2p-circuit/p2p/16Uiu2HAmUnknownUnknownUnknown",
        "/ip4/127.0.0.1/tcp/1/p2p/notapeerid/p2p-circuit/p2p/x",
    ],
)
def test_malformed_relay_addresses_are_clear_errors(bad: str) -> None:
    with pytest.raises(DialError, match="malformed relay address"):
        parse_circuit(bad)


async def test_relay_address_naming_an_unknown_validator_fails_fast() -> None:
    async with relayed_network() as ((validator,), private, _n), AsyncExitStack() as stack:
        client = await _client(stack, [validator])
        stranger = Identity.generate()
        bogus = Multiaddr(
            f"/ip4/127.0.0.1/tcp/1/p2p/{stranger.peer_id}/p2p-circuit/p2p/{private.peer_id}"
        )
        start = trio.current_time()
        with pytest.raises(DialError, match="relayed dial"):
            await client.connect(PeerInfo(private.peer_id, [bogus]), timeout=5)
        assert trio.current_time() - start < 3


async def test_a_reservation_is_for_the_asking_peer_only() -> None:
    """py-libp2p reserved for whatever PeerId RESERVE named: one peer could take the
    relay's slots in other peers' names."""
    async with AsyncExitStack() as stack:
        validator = await stack.enter_async_context(
            open_node(Identity.generate(), NodeConfig(dht_server=True, relay=RelaySettings()))
        )
        asker = await _client(stack, [validator])
        victim = Identity.generate().peer_id
        stream = await asker.host.new_stream(validator.peer_id, [HOP_PROTOCOL_ID])
        await write_delimited_msg(
            stream, HopMessage(type=HopMessage.RESERVE, peer=CircuitPeerId(id=victim.to_bytes()))
        )
        with trio.fail_after(5):
            answer = await read_delimited_msg(stream, HopMessage)
        assert StatusCode(answer.status) is StatusCode.OK
        reserved = validator.relay_protocol.resource_manager
        assert reserved.has_reservation(asker.peer_id)
        assert not reserved.has_reservation(victim)


async def test_hole_punching_knows_the_listen_ports_of_a_relayed_node() -> None:
    """DCUtR read the ports to punch from from ``host.get_addrs()``, which a private node
    fills with relayed addresses only: it had nothing to offer."""
    from libp2p.relay.circuit_v2 import dcutr

    async with relayed_network() as (_vals, private, _n):
        assert all(is_circuit(a) for a in private.host.get_addrs())
        port = int(str(private.host.get_transport_addrs()[0]).split("/")[4])
        assert (4, "127.0.0.1", port) in dcutr._local_tcp_listen_addrs(private.host)


async def test_a_validator_that_disappears_mid_circuit_ends_it_promptly() -> None:
    async with AsyncExitStack() as stack:
        holder = await stack.enter_async_context(trio.open_nursery())
        stop = trio.Event()

        async def run_validator(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            config = NodeConfig(dht_server=True, relay=RelaySettings())
            async with open_node(Identity.generate(), config) as validator:
                task_status.started(validator)
                await stop.wait()

        validator: Node = await holder.start(run_validator)
        boot = [Multiaddr(validator.listen_multiaddrs()[0])]
        private = await stack.enter_async_context(
            open_node(Identity.generate(), NodeConfig(bootstrap=boot, reachability="private"))
        )
        private.host.set_stream_handler(ECHO, _echo)
        nursery = await stack.enter_async_context(trio.open_nursery())
        await private.make_reachable(nursery)
        client = await _client(stack, [validator])
        await client.connect(PeerInfo(private.peer_id, [Multiaddr(private.listen_multiaddrs()[0])]))
        stream = await client.host.new_stream(private.peer_id, [ECHO])
        await stream.write(b"one")
        assert await stream.read(3) == b"one"
        stop.set()
        with trio.fail_after(5):  # never a hang: the circuit's stream ends
            with pytest.raises(Exception):  # noqa: B017 - reset or EOF, as py-libp2p has it
                await stream.write(b"two")
                if not await stream.read(3):
                    raise EOFError("circuit closed")
        await until(lambda: client.path_to(private.peer_id) is None)
        nursery.cancel_scope.cancel()
        holder.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("settings", "payload"),
    [
        (RelaySettings(circuit_bytes=64 * 1024), b"x" * 128 * 1024),  # over the byte limit
        (RelaySettings(circuit_duration_secs=1), b""),  # idle past the duration limit
    ],
)
async def test_circuit_limits_cut_the_circuit(settings: RelaySettings, payload: bytes) -> None:
    async with relayed_network(settings) as ((validator,), private, _n), AsyncExitStack() as st:
        client = await _client(st, [validator])
        addr = Multiaddr(private.listen_multiaddrs()[0])
        await client.connect(PeerInfo(private.peer_id, [addr]))
        assert await _roundtrip(client, private.peer_id) == b"ping"
        stats = validator.relay_protocol.stats  # type: ignore[attr-defined]
        if payload:
            with contextlib.suppress(Exception):  # the circuit may end mid-write
                await _roundtrip(client, private.peer_id, payload)
        await until(lambda: stats.circuits_cut == 1, timeout=10)
        await until(lambda: client.path_to(private.peer_id) is None, timeout=10)


async def test_a_reservation_is_renewed_when_due() -> None:
    async with relayed_network() as ((validator,), private, _n):
        keeper = private.reservations
        assert keeper is not None
        held = keeper.held[validator.peer_id]
        # Renewal is due at half the lifetime (1 h by default); make it due now.
        assert held.renew_at - time.time() > 1000
        relay = validator.relay_protocol.resource_manager
        before = relay.get_reservation(private.peer_id).expires_at  # type: ignore[union-attr]
        held.renew_at = 0
        assert not await keeper.maintain()  # renewed in place: the addresses are the same
        assert keeper.held[validator.peer_id].renew_at - time.time() > 1000
        after = relay.get_reservation(private.peer_id).expires_at  # type: ignore[union-attr]
        assert after >= before


@pytest.mark.parametrize(
    "garbage",
    [
        b"\xff\xff\xff\xff\x0f",  # a varint length far over the 64 KiB bound
        b"\x05\x01\x02",  # a short frame, then silence
        b"\x03\xde\xad\xbe",  # three bytes that are no HopMessage
    ],
)
async def test_garbage_on_a_hop_stream_leaves_the_relay_serving(garbage: bytes) -> None:
    async with relayed_network() as ((validator,), private, _n), AsyncExitStack() as stack:
        stranger = await _client(stack, [validator])
        stream = await stranger.host.new_stream(validator.peer_id, [HOP_PROTOCOL_ID])
        await stream.write(garbage)
        with trio.move_on_after(0.5):  # the relay may answer or just close; never hang it
            with contextlib.suppress(Exception):
                await stream.read(1024)
        await stream.reset()
        # Still relaying: a new client reaches the private node, a reservation still works.
        client = await _client(stack, [validator])
        addr = Multiaddr(private.listen_multiaddrs()[0])
        await client.connect(PeerInfo(private.peer_id, [addr]))
        assert await _roundtrip(client, private.peer_id) == b"ping"
        assert private.reservations is not None
        assert await private.reservations._reserve(private.validator_infos()[0]) is not None
