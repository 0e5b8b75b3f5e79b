"""Ordering executors for a request (pure code).

What this client observed comes ahead of what executors announce (any peer can announce
anything): an executor whose requests mostly failed, or whose receipts this client had to
refuse (:class:`~lloom.client.observed.Seen`), goes last. The others are ordered by a cost
in milliseconds: the observed time to a useful answer when known, else the measured
round-trip time; plus a penalty for announced load (a fully loaded executor counts as
``LOAD_PENALTY_MS`` slower; one announcing ``active >= max`` goes after the rest) and one
for observed unreliability (``UNRELIABILITY_PENALTY_MS`` times its share of bad outcomes).
An executor reached through a validator's relay counts ``RELAY_PENALTY_MS`` slower than
its measured time (the relay is one more hop and its capacity is shared), so it goes after
a comparable direct one; among executors not measured, direct ones come first.
Executors neither measured nor observed keep the order in which the DHT returned them,
after the measured ones; that first-found order is the fallback when nothing is known.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import TypeVar

from lloom.client.observed import Seen
from lloom.protocol.announce import LoadAnnouncement

#: Milliseconds of latency that a fully loaded executor is considered to cost.
LOAD_PENALTY_MS = 200.0
#: Milliseconds an executor with only bad outcomes is considered to cost.
UNRELIABILITY_PENALTY_MS = 5000.0
#: Milliseconds a relayed executor is considered to cost on top of what was measured.
RELAY_PENALTY_MS = 50.0
#: Share of bad outcomes from which an executor goes last, whatever it announces.
UNRELIABLE = 0.5

K = TypeVar("K")


def rank(
    found: Sequence[K],
    rtt_ms: Mapping[K, float],
    loads: Mapping[K, LoadAnnouncement],
    seen: Mapping[K, Seen] | None = None,
    relayed: Collection[K] = (),
) -> list[K]:
    """``found`` reordered best first (see the module docstring)."""
    observed = seen or {}

    def score(item: tuple[int, K]) -> tuple[int, float, int]:
        index, key = item
        mine = observed.get(key)
        if mine is not None and mine.bad and mine.unreliability >= UNRELIABLE:
            return (3, mine.unreliability, index)
        cost = mine.cost_ms() if mine is not None else None
        if cost is None:
            cost = rtt_ms.get(key)
        if cost is None:
            return (2, 1.0 if key in relayed else 0.0, index)
        load = loads.get(key)
        saturated = load is not None and load.active >= load.max
        cost += load.load * LOAD_PENALTY_MS if load is not None else 0.0
        cost += mine.unreliability * UNRELIABILITY_PENALTY_MS if mine is not None else 0.0
        cost += RELAY_PENALTY_MS if key in relayed else 0.0
        return (1 if saturated else 0, cost, index)

    return [key for _, key in sorted(enumerate(found), key=score)]
