"""The per-message patches of py-libp2p's Yamux and TCP (:mod:`lloom.node.muxer`): fewer
window updates, writes and ``recv`` calls, and nothing lost, reordered or left hanging."""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import trio
import trio.testing
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol
from libp2p.io.trio import TrioTCPStream
from libp2p.network.connection.exceptions import RawConnError
from libp2p.network.stream.exceptions import StreamError
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.stream_muxer.exceptions import MuxedStreamError
from libp2p.stream_muxer.yamux import yamux as yamux_module
from multiaddr import Multiaddr

from lloom.identity import Identity
from lloom.node import muxer
from lloom.node.host import build_host

pytestmark = pytest.mark.timeout(60)

PROTO = TProtocol("/lloom/test-muxer/1")
LISTEN = [Multiaddr("/ip4/127.0.0.1/tcp/0")]


@dataclass
class Pair:
    """Two connected hosts; ``accepted`` receives the server side of each stream."""

    client: Any
    server: Any
    accepted: trio.MemoryReceiveChannel[INetStream]

    async def open(self) -> Any:
        return await self.client.new_stream(self.server.get_id(), [PROTO])

    def muxed(self, host: Any) -> Any:
        other = self.server if host is self.client else self.client
        conns = host.get_network().get_connections(other.get_id())
        return conns[0].muxed_conn


@asynccontextmanager
async def pair() -> AsyncIterator[Pair]:
    muxer.apply_all()
    a = build_host(Identity.generate(), LISTEN)
    b = build_host(Identity.generate(), LISTEN)
    send, receive = trio.open_memory_channel[INetStream](100)

    async def handler(stream: INetStream) -> None:
        await send.send(stream)
        await trio.sleep_forever()  # the test drives the stream

    async with a.run(LISTEN), b.run(LISTEN):
        a.set_stream_handler(PROTO, handler)
        info = info_from_p2p_addr(a.get_addrs()[0])
        await b.connect(info)
        try:
            yield Pair(b, a, receive)
        finally:
            await b.close()
            await a.close()


def frame_types(muxed: Any) -> Counter[str]:
    """Count the Yamux frames ``muxed`` writes, by type (wraps its ``_write_frame``)."""
    seen: Counter[str] = Counter()
    original = muxed._write_frame
    names = {yamux_module.TYPE_DATA: "data", yamux_module.TYPE_WINDOW_UPDATE: "window"}

    async def counting(data: bytes) -> None:
        typ = struct.unpack(yamux_module.YAMUX_HEADER_FORMAT, data[:12])[1]
        seen[names.get(typ, "other")] += 1
        await original(data)

    muxed._write_frame = counting
    return seen


async def read_exactly(stream: INetStream, size: int) -> bytes:
    data = b""
    while len(data) < size:
        data += await stream.read(size - len(data))
    return data


async def test_small_reads_return_credit_once_half_the_window_is_used() -> None:
    async with pair() as p:
        stream = await p.open()
        await stream.write(b"open")
        served = await p.accepted.receive()
        assert await read_exactly(served, 4) == b"open"
        sent = frame_types(p.muxed(p.server))
        message = b"m" * 100
        for _ in range(200):  # 20 kB: well under half of the 256 KiB window
            await stream.write(message)
            assert await read_exactly(served, len(message)) == message
        assert sent["window"] == 0  # py-libp2p sent one after almost every read
        big = b"b" * (300 * 1024)  # more than the window: credit must come back
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.write, big)
            assert await read_exactly(served, len(big)) == big
        assert 1 <= sent["window"] <= 3


async def test_frames_written_at_once_share_writes_and_arrive_whole_and_in_order() -> None:
    async with pair() as p:
        streams = [await p.open() for _ in range(20)]
        served = []
        for i, stream in enumerate(streams):
            await stream.write(b"%02d" % i)
            peer = await p.accepted.receive()
            served.append((int(await read_exactly(peer, 2)), peer))
        served.sort(key=lambda item: item[0])
        secured = p.muxed(p.client).secured_conn
        writes = 0
        original = secured.write

        async def counting(data: bytes) -> None:
            nonlocal writes
            writes += 1
            await original(data)

        secured.write = counting
        async with trio.open_nursery() as nursery:
            for i, stream in enumerate(streams):
                for k in range(5):
                    nursery.start_soon(stream.write, b"<%02d:%d>" % (i, k))
        assert writes <= 5  # 100 frames ready at once: py-libp2p wrote each on its own
        for i, peer in served:
            got = await read_exactly(peer, 5 * 6)
            assert sorted(got[j : j + 6] for j in range(0, 30, 6)) == [
                b"<%02d:%d>" % (i, k) for k in range(5)
            ]


async def test_a_writer_cancelled_while_its_frame_waits_leaves_the_connection_whole() -> None:
    async with pair() as p:
        first, second = await p.open(), await p.open()
        await first.write(b"1")
        await second.write(b"2")
        peers = {}
        for _ in range(2):
            peer = await p.accepted.receive()
            peers[await read_exactly(peer, 1)] = peer
        big = b"x" * 60_000
        async with trio.open_nursery() as nursery:
            nursery.start_soon(first.write, big)
            await trio.lowlevel.checkpoint()
            with trio.move_on_after(0):  # cancelled at once, its frame queued or written
                await second.write(b"y" * 1000)
        assert await read_exactly(peers[b"1"], len(big)) == big
        await second.write(b"after")
        tail = await read_exactly(peers[b"2"], 5)
        assert tail in (b"after", b"yyyyy")  # the cancelled frame went whole, or not at all
        if tail == b"yyyyy":
            assert (await read_exactly(peers[b"2"], 995 + 5))[-5:] == b"after"


async def test_a_failed_write_fails_its_writers_and_every_later_one() -> None:
    async with pair() as p:
        stream = await p.open()
        muxed = p.muxed(p.client)

        async def broken(data: bytes) -> None:
            raise RawConnError("socket gone")

        muxed.secured_conn.write = broken
        with pytest.raises(StreamError, match="socket gone"):
            await stream.write(b"lost")
        with pytest.raises(Exception, match="broken by an earlier write"):
            await muxed._write_frame(b"\x00" * 12)


async def test_writes_beyond_the_window_and_on_closed_streams_take_py_libp2ps_path() -> None:
    async with pair() as p:
        stream = await p.open()
        await stream.close()
        with pytest.raises(MuxedStreamError):
            await stream.muxed_stream.write(b"late")
        assert not muxer.fits_window(stream, 0)
        fresh = await p.open()
        assert muxer.fits_window(fresh, 1000)
        assert not muxer.fits_window(fresh, 300 * 1024)  # more than one frame / the window


async def test_tcp_reads_are_served_from_one_recv() -> None:
    muxer.buffer_tcp_reads()
    left, right = trio.testing.memory_stream_pair()
    tcp = TrioTCPStream(right)  # type: ignore[arg-type]
    calls = 0
    original = right.receive_some

    async def counting(max_bytes: int | None = None) -> bytes:
        nonlocal calls
        calls += 1
        return await original(max_bytes)

    right.receive_some = counting  # type: ignore[method-assign]
    await left.send_all(b"\x00\x05hello\x00\x03abc")
    assert await tcp.read(2) == b"\x00\x05"
    assert await tcp.read(5) == b"hello"
    assert await tcp.read(0) == b""
    assert await tcp.read(2) == b"\x00\x03"
    assert await tcp.read(None) == b"abc"
    assert calls == 1  # py-libp2p: one recv per read, four here
    await left.send_all(b"more")
    assert await tcp.read(100) == b"more"
    assert calls == 2


async def test_a_writer_writes_one_batch_and_the_next_batch_writes_itself() -> None:
    async with pair() as p:
        stream = await p.open()
        await stream.write(b"x")
        peer = await p.accepted.receive()
        await read_exactly(peer, 1)
        muxed = p.muxed(p.client)
        original = muxed.secured_conn.write
        writes = 0

        async def slow(data: bytes) -> None:
            nonlocal writes
            await trio.sleep(0.02)  # others queue meanwhile
            await original(data)
            writes += 1

        muxed.secured_conn.write = slow
        sid = stream.muxed_stream.stream_id
        frame = struct.pack(yamux_module.YAMUX_HEADER_FORMAT, 0, yamux_module.TYPE_DATA, 0, sid, 1)
        returned_after: dict[str, int] = {}

        async def write(name: str) -> None:
            await muxed._write_frame(frame + b"y")
            returned_after[name] = writes

        async with trio.open_nursery() as nursery:
            nursery.start_soon(write, "first")
            await trio.sleep(0.005)  # the first write is under way
            for name in ("second", "third"):
                nursery.start_soon(write, name)
        # The first caller went on after its own write; the two others shared the next one.
        assert returned_after == {"first": 1, "second": 2, "third": 2}
        assert await read_exactly(peer, 3) == b"yyy"
