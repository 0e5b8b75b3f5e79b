"""A lookup that cannot complete is not "nobody provides it"."""

from __future__ import annotations

import pytest
import trio

from lloom.dhtkeys import model_key
from lloom.errors import DiscoveryFailed
from lloom.identity import Identity
from lloom.node.node import NodeConfig, open_node
from tests.node.conftest import network

pytestmark = pytest.mark.timeout(60)


async def test_no_validator_is_a_failed_lookup_and_none_found_is_empty() -> None:
    async with open_node(Identity.generate(), NodeConfig()) as alone:
        with pytest.raises(DiscoveryFailed, match="no validator"):
            await alone.dht.find_providers(model_key("m"))
    async with network(1) as (_validator, (client,)):
        assert await client.dht.find_providers(model_key("nobody-serves-this")) == []


async def test_a_lookup_that_times_out_is_a_failed_lookup(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with network(1) as (_validator, (client,)):

        async def stuck(key: str, count: int = 20) -> list[object]:
            await trio.sleep(3600)
            return []

        monkeypatch.setattr(client.dht.kad, "find_providers", stuck)
        with pytest.raises(DiscoveryFailed, match="did not complete"):
            await client.dht.find_providers(model_key("m"), timeout=0.2)
