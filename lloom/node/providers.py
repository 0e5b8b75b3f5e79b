"""How a validator keeps and hands out large provider sets (workarounds for py-libp2p 0.8.1).

A popular model has hundreds of executors, each a provider of the model's DHT key.

- **Keeping them.** py-libp2p stores at most k = 20 providers per key and silently ignores
  the 21st (``ProviderStore.add_provider``), so a model could never have more than 20
  executors in the whole network. A validator keeps up to ``max_per_key`` (10,000 by
  default); one record is a PeerInfo with its addresses, ~720 B (measured, docs/node.md), so
  10,000 executors of one model cost a validator about 7 MB.
- **Handing them out.** py-libp2p answers GET_PROVIDERS with every provider it holds: 10,000
  records would be a message of several MiB per lookup. A validator answers with a uniform
  random sample of at most ``per_response`` (20), so successive lookups find every executor
  and none is always first. The requester's own record, when it is a provider of the key,
  is always in the answer: that is how an executor confirms its announcement, at any scale.

The requester of a GET_PROVIDERS is the PeerId the DHT handler passes to
``maybe_consume_signed_record`` just before it reads the store; :func:`track_requesters`
notes it in a context variable of the handler's task.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from typing import Any

import libp2p.kad_dht.kad_dht as kad_dht_module
from libp2p.kad_dht.provider_store import ProviderRecord, ProviderStore
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

logger = logging.getLogger(__name__)

#: Providers a validator keeps per key.
MAX_PROVIDERS_PER_KEY = 10_000
#: Providers in one GET_PROVIDERS answer.
PROVIDERS_PER_RESPONSE = 20

_requester: ContextVar[ID | None] = ContextVar("lloom_kad_requester", default=None)


def track_requesters() -> None:
    """Note the requester of each DHT message in its handler's task (idempotent)."""
    original: Callable[..., bool] = kad_dht_module.maybe_consume_signed_record  # type: ignore[attr-defined]
    if getattr(original, "lloom_tracks_requesters", False):
        return

    def consume(msg: Any, host: Any, peer_id: ID | None = None) -> bool:
        if peer_id is not None:
            _requester.set(peer_id)
        return original(msg, host, peer_id)

    consume.lloom_tracks_requesters = True  # type: ignore[attr-defined]
    kad_dht_module.maybe_consume_signed_record = consume  # type: ignore[attr-defined]


def sample(
    providers: Sequence[PeerInfo],
    requester: ID | None,
    size: int,
    rng: random.Random | None = None,
) -> list[PeerInfo]:
    """At most ``size`` of ``providers`` chosen uniformly, the requester's own record
    always among them when it is one (pure code)."""
    chooser = rng or random
    if len(providers) <= size:
        picked = list(providers)
        chooser.shuffle(picked)
        return picked
    own = next((p for p in providers if p.peer_id == requester), None)
    others = [p for p in providers if p is not own]
    picked = chooser.sample(others, size - 1 if own is not None else size)
    return [own, *picked] if own is not None else picked


class ProviderPolicy:
    """Installs the larger store and the sampled answers on one validator's store."""

    def __init__(
        self,
        store: ProviderStore,
        max_per_key: int = MAX_PROVIDERS_PER_KEY,
        per_response: int = PROVIDERS_PER_RESPONSE,
    ) -> None:
        self.store = store
        self.max_per_key = max_per_key
        self.per_response = per_response
        self._all = store.get_providers  # py-libp2p's: every unexpired record
        store.add_provider = self.add_provider  # type: ignore[method-assign]
        store.get_providers = self.get_providers  # type: ignore[method-assign]
        track_requesters()

    def add_provider(self, key: bytes, provider: PeerInfo) -> None:
        """Keep ``provider`` for ``key`` (refreshing it), up to ``max_per_key`` per key."""
        if not provider or not provider.peer_id:
            return
        records = self.store.providers.setdefault(key, {})
        name = str(provider.peer_id)
        if name not in records and len(records) >= self.max_per_key:
            logger.warning(
                "provider limit (%d) reached for key %s; ignoring %s",
                self.max_per_key,
                key.hex()[:16],
                provider.peer_id,
            )
            return
        records[name] = ProviderRecord(provider_info=provider)

    def get_providers(self, key: bytes) -> list[PeerInfo]:
        """A sample of the providers of ``key`` for the peer asking (see the module doc)."""
        return sample(self._all(key), _requester.get(), self.per_response)
