"""An executor whose re-announcement is not confirmed re-announces over fresh connections."""

from __future__ import annotations

from functools import partial
from typing import Any, cast

import pytest
import trio

from lloom.executor import server
from lloom.executor.handler import RequestHandler
from lloom.node.node import Node


class FakeConfig:
    bootstrap = ("/ip4/127.0.0.1/tcp/1/p2p/validator",)


class FakeNode:
    pubsub = None
    reservations = None
    config = FakeConfig()

    def __init__(self) -> None:
        self.reconnects = 0
        self.addrs_changed = trio.Event()

    async def bootstrap(self) -> int:
        return 1

    async def reconnect_bootstrap(self) -> int:
        self.reconnects += 1
        return 1


async def test_unconfirmed_reprovide_reconnects_then_announces_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[int] = []
    third = trio.Event()

    async def announce(node: Any, models: list[str], attempts: int = 4) -> int:
        calls.append(attempts)
        if len(calls) >= 3:
            third.set()
        return 1 if len(calls) == 1 else 2  # the first round misses the model key

    monkeypatch.setattr(server, "announce_keys", announce)
    node = FakeNode()
    handler = cast(RequestHandler, type("H", (), {"models": ["m"]})())
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                partial(server.keep_announcing, reprovide_interval=0.01),
                cast(Node, node),
                handler,
            )
            await third.wait()  # a readiness signal, not a time window
            nursery.cancel_scope.cancel()
    assert node.reconnects == 1
    assert calls[:3] == [1, 3, 1]  # after the fresh connections, a confirmed round


async def test_an_executor_without_any_relay_reservation_stops_announcing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Behind NAT with no reservation left nobody can reach it: announcing its models
    would send clients to a dead end. It announces again once a reservation is back."""
    calls: list[int] = []
    announced = trio.Event()

    async def announce(node: Any, models: list[str], attempts: int = 4) -> int:
        calls.append(attempts)
        announced.set()
        return 2

    class NoReservation:
        held: dict[str, object] = {}  # noqa: RUF012 - a stand-in, never mutated

    class CountingNode(FakeNode):
        def __init__(self) -> None:
            super().__init__()
            self.rounds = 0
            self.five_rounds = trio.Event()

        async def bootstrap(self) -> int:
            self.rounds += 1
            if self.rounds == 5:
                self.five_rounds.set()
            return 1

    monkeypatch.setattr(server, "announce_keys", announce)
    node = CountingNode()
    node.reservations = NoReservation()  # type: ignore[assignment]
    handler = cast(RequestHandler, type("H", (), {"models": ["m"]})())
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                partial(server.keep_announcing, reprovide_interval=0.01),
                cast(Node, node),
                handler,
            )
            await node.five_rounds.wait()  # five rounds without a reservation
            assert calls == []
            NoReservation.held = {"validator": object()}
            await announced.wait()
            nursery.cancel_scope.cancel()
    assert calls and calls[0] == 1
