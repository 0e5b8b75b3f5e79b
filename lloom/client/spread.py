"""Spreading concurrent requests over the executors a client found (pure code).

Ranking alone sends every request to the same best executor. The client library therefore
picks each request's first executor by **two random choices**: two executors drawn at
random among the usable ones, the one with fewer requests outstanding from this client wins
(announced load breaks ties, then chance: ties broken by rank sent the last-ranked executor
nothing when requests ended before the next began). Equal executors share the load evenly;
a slow one keeps requests longer, so it is chosen less. The rest of the ranked list
follows, for failover. Executors this client saw mostly failing, and (in
:class:`~lloom.client.network.NetworkClient`) those that refused a request as ``busy`` in
the last second, are not drawn.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

K = TypeVar("K")


def spread(
    ranked: Sequence[K],
    outstanding: Mapping[K, int],
    *,
    usable: Callable[[K], bool] = lambda _: True,
    load: Callable[[K], float] = lambda _: 0.0,
    rng: random.Random | None = None,
) -> list[K]:
    """``ranked`` with the executor chosen for the next request first (see the module)."""
    pool = [k for k in ranked if usable(k)]
    if not pool:
        return list(ranked)
    if len(pool) == 1:  # the only usable one goes first, the others stay for failover
        return [pool[0], *(k for k in ranked if k != pool[0])]
    chooser = rng or random
    a, b = chooser.sample(pool, 2)  # in random order: min keeps the first of equals

    def key(k: K) -> tuple[int, float]:
        return (outstanding.get(k, 0), load(k))

    first = min(a, b, key=key)
    return [first, *(k for k in ranked if k != first)]
