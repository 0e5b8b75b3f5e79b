"""Ordering executors for a request (pure code).

Executors that answered a ping come first, ordered by a score that adds the measured
round-trip time to a penalty for announced load (a fully loaded executor counts as
``LOAD_PENALTY_MS`` slower; one announcing ``active >= max`` goes last among the
reachable). Executors not measured keep the order in which the DHT returned them, after
the measured ones; that first-found order is the fallback when nothing was measured.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TypeVar

from lloom.protocol.announce import LoadAnnouncement

#: Milliseconds of latency that a fully loaded executor is considered to cost.
LOAD_PENALTY_MS = 200.0

K = TypeVar("K")


def rank(
    found: Sequence[K],
    rtt_ms: Mapping[K, float],
    loads: Mapping[K, LoadAnnouncement],
) -> list[K]:
    """``found`` reordered best first (see the module docstring)."""

    def score(item: tuple[int, K]) -> tuple[int, float, int]:
        index, key = item
        load = loads.get(key)
        saturated = load is not None and load.active >= load.max
        if key not in rtt_ms:
            return (2, 0.0, index)
        penalty = load.load * LOAD_PENALTY_MS if load is not None else 0.0
        return (1 if saturated else 0, rtt_ms[key] + penalty, index)

    return [key for _, key in sorted(enumerate(found), key=score)]
