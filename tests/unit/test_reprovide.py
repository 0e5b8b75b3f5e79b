"""An executor whose re-announcement is not confirmed re-announces over fresh connections."""

from __future__ import annotations

from typing import Any, cast

import pytest
import trio

from lloom.executor import server
from lloom.executor.handler import RequestHandler
from lloom.node.node import Node


class FakeNode:
    pubsub = None

    def __init__(self) -> None:
        self.reconnects = 0

    async def bootstrap(self) -> int:
        return 1

    async def reconnect_bootstrap(self) -> int:
        self.reconnects += 1
        return 1


async def test_unconfirmed_reprovide_reconnects_then_announces_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[int] = []

    async def announce(node: Any, models: list[str], attempts: int = 4) -> int:
        calls.append(attempts)
        return 1 if len(calls) == 1 else 2  # the first round misses the model key

    monkeypatch.setattr(server, "announce_keys", announce)
    node = FakeNode()
    handler = cast(RequestHandler, type("H", (), {"models": ["m"]})())
    with trio.move_on_after(0.25):
        await server.keep_announcing(cast(Node, node), handler, reprovide_interval=0.1)
    assert node.reconnects == 1
    assert calls[:3] == [1, 3, 1]  # after the fresh connections, a confirmed round
