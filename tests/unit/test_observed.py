"""Ranking strangers by what the client observed of them, and keeping it."""

from __future__ import annotations

from pathlib import Path

from lloom.client.observed import ExecutorBook, Seen
from lloom.client.ranking import rank
from lloom.protocol.announce import LoadAnnouncement


def idle(models: tuple[str, ...] = ("m",)) -> LoadAnnouncement:
    return LoadAnnouncement(models, 0, 16, 0.0)


def test_a_refused_receipt_puts_an_executor_last_whatever_it_announces() -> None:
    book = ExecutorBook()
    book.refused("rogue")
    rtts = {"rogue": 1.0, "honest": 9.0, "unknown": 0.5}
    seen = {p: s for p in rtts if (s := book.get(p)) is not None}
    order = rank(["rogue", "honest", "unmeasured"], rtts, {"rogue": idle()}, seen)
    assert order == ["honest", "unmeasured", "rogue"]


def test_observed_speed_comes_before_ping_and_announcements() -> None:
    book = ExecutorBook()
    for _ in range(3):
        book.succeeded("slow", ttft_s=0.8, tokens=100, stream_s=10.0)  # 10 tokens/s
        book.succeeded("fast", ttft_s=0.05, tokens=100, stream_s=1.0)  # 100 tokens/s
    seen = {p: s for p in ("slow", "fast") if (s := book.get(p)) is not None}
    # the slow one pings faster and announces less load: what was seen decides
    order = rank(["slow", "fast"], {"slow": 0.2, "fast": 5.0}, {"slow": idle()}, seen)
    assert order == ["fast", "slow"]


def test_occasional_failures_cost_less_than_mostly_failing() -> None:
    shaky = Seen(successes=9, failures=1)
    assert shaky.unreliability < 0.5
    order = rank(["shaky", "steady"], {"shaky": 1.0, "steady": 1.0}, {}, {"shaky": shaky})
    assert order == ["steady", "shaky"]
    order = rank(["shaky", "slow"], {"shaky": 1.0, "slow": 900.0}, {}, {"shaky": shaky})
    assert order == ["shaky", "slow"]  # 10 % failures ~ +500 ms, still ahead of 900 ms
    assert Seen().unreliability == 0.0 and Seen().cost_ms() is None


def test_the_book_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "executors.sqlite3"
    book = ExecutorBook(path)
    book.succeeded("a", ttft_s=0.1, tokens=20, stream_s=1.0)
    book.failed("b")
    book.refused("b")
    book.save()
    again = ExecutorBook(path)
    a, b = again.get("a"), again.get("b")
    assert a is not None and a.successes == 1 and a.ttft_ms == 100.0 and a.tokens_per_s == 20.0
    assert b is not None and (b.failures, b.refusals) == (1, 1)
    assert (path.stat().st_mode & 0o777) == 0o600


def test_a_relayed_executor_goes_after_a_comparable_direct_one() -> None:
    both = ["relayed", "direct"]
    relayed = {"relayed"}
    # Equal measured time: direct first; relayed first only when clearly faster.
    assert rank(both, {"relayed": 5.0, "direct": 5.0}, {}, relayed=relayed) == [
        "direct",
        "relayed",
    ]
    assert rank(both, {"relayed": 5.0, "direct": 80.0}, {}, relayed=relayed) == both
    # Unmeasured: direct ones before relayed ones, each in found order.
    assert rank(["r1", "d1", "r2", "d2"], {}, {}, relayed={"r1", "r2"}) == ["d1", "d2", "r1", "r2"]
