"""How a validator keeps and hands out large provider sets (lloom.node.providers)."""

from __future__ import annotations

import random
from types import SimpleNamespace
from typing import Any, cast

from libp2p.kad_dht.provider_store import ProviderStore
from libp2p.peer.peerinfo import PeerInfo

from lloom.identity import Identity
from lloom.node import providers
from lloom.node.providers import ProviderPolicy, sample

KEY = b"\x12\x20" + b"k" * 32


def peers(n: int) -> list[PeerInfo]:
    return [PeerInfo(Identity.generate().peer_id, []) for _ in range(n)]


def store() -> ProviderStore:
    host = SimpleNamespace(get_id=lambda: Identity.generate().peer_id)
    return ProviderStore(cast(Any, host))


def test_the_21st_and_the_1000th_provider_are_kept() -> None:
    s = store()
    policy = ProviderPolicy(s, max_per_key=1000)
    everyone = peers(1001)
    for info in everyone:
        s.add_provider(KEY, info)
    assert len(s.providers[KEY]) == 1000  # the 1,001st is over this validator's limit
    assert str(everyone[20].peer_id) in s.providers[KEY]
    assert len(policy.get_providers(KEY)) == providers.PROVIDERS_PER_RESPONSE


def test_answers_are_fair_samples_that_always_hold_the_requester() -> None:
    rng = random.Random(7)
    everyone = peers(100)
    me = everyone[73].peer_id
    seen: set[str] = set()
    for _ in range(60):
        picked = sample(everyone, me, 20, rng)
        assert len(picked) == 20 and picked[0].peer_id == me
        assert len({p.peer_id for p in picked}) == 20
        seen |= {str(p.peer_id) for p in picked}
    assert len(seen) == 100  # every provider gets handed out
    small = everyone[:5]
    assert sorted(str(p.peer_id) for p in sample(small, None, 20, rng)) == sorted(
        str(p.peer_id) for p in small
    )


def test_the_requester_is_taken_from_the_dht_handler() -> None:
    s = store()
    policy = ProviderPolicy(s, per_response=3)
    everyone = peers(50)
    for info in everyone:
        s.add_provider(KEY, info)
    me = everyone[42].peer_id
    providers._requester.set(me)
    assert policy.get_providers(KEY)[0].peer_id == me
