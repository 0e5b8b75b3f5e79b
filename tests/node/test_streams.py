"""Framed streams over real libp2p streams: good frames, and every bad input, never a hang."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.peerinfo import info_from_p2p_addr
from multiaddr import Multiaddr

from lloom.errors import FrameTooLarge, PeerTimeout, ProtocolError, TruncatedFrame
from lloom.framing import encode_frame, encode_varint
from lloom.identity import Identity
from lloom.node.host import build_host
from lloom.node.streams import FramedStream

pytestmark = pytest.mark.timeout(60)

PROTO = TProtocol("/lloom/test/1")
Handler = Callable[[INetStream], Awaitable[None]]
LISTEN = [Multiaddr("/ip4/127.0.0.1/tcp/0")]


@asynccontextmanager
async def stream_to(
    server: Handler,
) -> AsyncIterator[FramedStream]:
    """A framed client stream to a host whose handler is ``server``."""
    a = build_host(Identity.generate(), LISTEN)
    b = build_host(Identity.generate(), LISTEN)
    async with a.run(LISTEN), b.run(LISTEN):
        a.set_stream_handler(PROTO, server)
        info = info_from_p2p_addr(a.get_addrs()[0])
        await b.connect(info)
        raw = await b.new_stream(info.peer_id, [PROTO])
        framed = FramedStream(raw, max_frame=1024, read_timeout=2.0)
        try:
            yield framed
        finally:
            await framed.reset()
            await b.close()
            await a.close()


async def test_echo_round_trip() -> None:
    async def echo(stream: INetStream) -> None:
        framed = FramedStream(stream, max_frame=1024)
        while (frame := await framed.read_frame()) is not None:
            await framed.write_frame(frame[::-1])
        await framed.close()

    async with stream_to(echo) as s:
        for payload in (b"hello", b"", b"x" * 1024):
            await s.write_frame(payload)
            assert await s.read_frame() == payload[::-1]


def _raw_server(data: bytes, then_close: bool = True) -> Callable[[INetStream], Awaitable[None]]:
    async def handler(stream: INetStream) -> None:
        await stream.write(data)
        if then_close:
            await stream.close()
        else:
            await trio.sleep_forever()

    return handler


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (encode_varint(10**9), FrameTooLarge),  # claims 1 GB: refused at once
        (b"\xff" * 12, ProtocolError),  # varint too long
        (b"\x81\x00", ProtocolError),  # non-minimal varint
        (encode_frame(b"abcdef")[:-2], TruncatedFrame),  # ends mid-frame
    ],
)
async def test_bad_input_raises_protocol_error(data: bytes, error: type[Exception]) -> None:
    async with stream_to(_raw_server(data)) as s:
        with trio.fail_after(5), pytest.raises(error):
            await s.read_frame()


async def test_clean_eof_between_frames_is_none() -> None:
    async with stream_to(_raw_server(encode_frame(b"one"))) as s:
        assert await s.read_frame() == b"one"
        assert await s.read_frame() is None


async def test_silent_peer_times_out() -> None:
    async with stream_to(_raw_server(b"\x05ab", then_close=False)) as s:
        start = trio.current_time()
        with pytest.raises(PeerTimeout):
            await s.read_frame(timeout=0.3)
        assert trio.current_time() - start < 2


async def test_refuses_to_send_oversized() -> None:
    async with stream_to(_raw_server(b"")) as s:
        with pytest.raises(FrameTooLarge):
            await s.write_frame(b"x" * 1025)
