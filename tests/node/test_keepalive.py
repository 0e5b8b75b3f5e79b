"""A peer that stops answering (a cut cable: no FIN, no RST) is dropped within the yamux
keep-alive bound, so validators stop handing out a dead executor (workaround
:func:`lloom.node.patches.close_dead_connections`)."""

from __future__ import annotations

import struct
from typing import Any

import pytest
import trio
from libp2p.stream_muxer.yamux import yamux as yamux_module

from lloom.dhtkeys import model_key
from lloom.node import patches
from tests.node.conftest import network

pytestmark = pytest.mark.timeout(60)


def deafen(conn: Any) -> None:
    """Make ``conn``'s side never answer keep-alive pings, as a peer behind a cut cable."""
    muxed = conn.muxed_conn
    original = muxed._write_frame

    async def write_frame(data: bytes) -> None:
        if len(data) >= 12:
            _version, typ, flags, _sid, _length = struct.unpack(
                yamux_module.YAMUX_HEADER_FORMAT, data[:12]
            )
            if typ == yamux_module.TYPE_PING and flags & yamux_module.FLAG_ACK:
                return
        await original(data)

    muxed._write_frame = write_frame


async def test_a_validator_drops_an_executor_that_stopped_answering(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(patches, "KEEPALIVE_INTERVAL", 0.2)
    monkeypatch.setattr(patches, "KEEPALIVE_TIMEOUT", 0.5)
    key = model_key("keepalive")
    async with network(2) as (validator, (executor, client)):
        assert await executor.dht.provide(key)
        assert [p.peer_id for p in await client.dht.find_providers(key)] == [executor.peer_id]
        for conn in executor.host.get_network().get_connections(validator.peer_id):
            deafen(conn)
        with trio.fail_after(10):
            while await client.dht.find_providers(key):  # noqa: ASYNC110 - no event to await
                await trio.sleep(0.05)
