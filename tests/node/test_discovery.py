"""A lookup that cannot complete is not "nobody provides it"."""

from __future__ import annotations

import pytest
import trio

from lloom.dhtkeys import cid_string, model_key
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


async def test_a_lookup_nobody_answered_is_a_failed_lookup_not_an_empty_one() -> None:
    """A validator whose DHT handler turns every stream away (as a full one does: py-libp2p
    resets streams beyond its inbound limit): py-libp2p's lookup returns [] then, which
    would read as "no executor"; lloom asks again and says the lookup failed."""
    async with network(2) as (validator, (executor, client)):
        assert await executor.dht.provide(model_key("m"))
        assert len(await client.dht.find_providers(model_key("m"))) == 1
        full = trio.CapacityLimiter(1)
        await full.acquire_on_behalf_of("busy")
        validator.dht.kad._inbound_limiter = full
        client.dht.kad.provider_store.providers.clear()  # py-libp2p's local cache
        assert await client.dht.kad.find_providers(cid_string(model_key("m"))) == []  # the defect
        with pytest.raises(DiscoveryFailed, match="no DHT server answered"):
            await client.dht.find_providers(model_key("m"))
        # py-libp2p dropped the validator from the routing table after the failed stream;
        # a connected validator stays, so the next lookup needs no new bootstrap round.
        assert validator.peer_id in client.dht.kad.routing_table.get_peer_ids()
        full.release_on_behalf_of("busy")
        assert len(await client.dht.find_providers(model_key("m"))) == 1


async def test_reconnecting_to_the_validators_keeps_the_node_in_the_dht() -> None:
    async with network(1) as (validator, (executor,)):
        assert await executor.dht.provide(model_key("m"))
        assert await executor.reconnect_bootstrap() == 1
        assert executor.host.get_network().get_connections(validator.peer_id)
        assert validator.peer_id in executor.dht.kad.routing_table.get_peer_ids()
        assert await executor.dht.provide(model_key("m"))  # the records come back
