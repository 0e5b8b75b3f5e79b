"""Two random choices spread requests evenly, away from slow and failing executors."""

from __future__ import annotations

import random
from collections import Counter

from lloom.client.spread import spread


def simulate(speeds: dict[str, int], requests: int, concurrency: int) -> Counter[str]:
    """Requests arrive while ``concurrency`` are running; an executor holds each request
    for ``speeds[name]`` ticks. Returns how many each served."""
    rng = random.Random(3)
    ranked = sorted(speeds)
    outstanding: Counter[str] = Counter()
    running: list[tuple[int, str]] = []
    served: Counter[str] = Counter()
    tick = 0
    for _ in range(requests):
        while len(running) >= concurrency:
            tick = min(t for t, _ in running)
            for done in [r for r in running if r[0] <= tick]:
                running.remove(done)
                outstanding[done[1]] -= 1
        chosen = spread(ranked, outstanding, rng=rng)[0]
        outstanding[chosen] += 1
        served[chosen] += 1
        running.append((tick + speeds[chosen], chosen))
    return served


def test_equal_executors_each_get_between_half_and_twice_their_share() -> None:
    served = simulate({f"e{i:02}": 10 for i in range(20)}, 400, 16)
    assert len(served) == 20
    assert all(10 <= n <= 40 for n in served.values()), served


def test_ties_are_broken_by_chance_not_by_rank() -> None:
    """Requests that end before the next starts leave every executor at 0 outstanding: ties
    broken by rank sent the last-ranked executor nothing (a fast backend behind a gateway
    gave 9 to one executor and 30 to another of 20 in tests/e2e/test_scale.py)."""
    served = simulate({f"e{i:02}": 1 for i in range(20)}, 400, 1)
    assert len(served) == 20
    assert all(10 <= n <= 40 for n in served.values()), served


def test_a_slow_executor_gets_less() -> None:
    speeds = {f"e{i:02}": 10 for i in range(9)} | {"slow": 100}
    served = simulate(speeds, 400, 16)
    assert served["slow"] < 400 / 10 / 2


def test_failing_executors_are_not_drawn_and_few_keep_the_ranking() -> None:
    ranked = ["a", "b", "c", "bad"]
    for seed in range(50):
        order = spread(ranked, {}, usable=lambda k: k != "bad", rng=random.Random(seed))
        assert order[0] != "bad" and sorted(order) == sorted(ranked)
    assert spread(["only"], {}) == ["only"]
    assert spread(["a", "bad"], {}, usable=lambda k: k != "bad") == ["a", "bad"]


def test_the_only_usable_executor_goes_first() -> None:
    """With one of two executors benched (busy, unreachable), the other is chosen; the
    benched one stays in the list for failover."""
    assert spread(["a", "b"], {}, usable=lambda k: k == "b") == ["b", "a"]
    assert spread(["a", "b"], {}, usable=lambda _: False) == ["a", "b"]
