"""Pure client logic: ranking, load table, announcements, exit codes, retryability."""

from __future__ import annotations

import pytest

from lloom.client.cli import exit_code_for
from lloom.client.loads import LoadTable
from lloom.client.ranking import rank
from lloom.client.session import retryable
from lloom.errors import (
    AllExecutorsFailed,
    NetworkError,
    NoExecutorError,
    PartialResponseError,
    ProtocolError,
    RemoteError,
    RequestTimeout,
    UsageError,
)
from lloom.protocol.announce import LoadAnnouncement


def ann(active: int, cap: int = 10, models: tuple[str, ...] = ("m",)) -> LoadAnnouncement:
    return LoadAnnouncement(models, active, cap, 0.0)


def test_rank_by_latency_then_load() -> None:
    found = ["a", "b", "c", "d"]
    rtt = {"a": 30.0, "b": 5.0, "c": 10.0}
    assert rank(found, rtt, {}) == ["b", "c", "a", "d"]
    # b is half loaded (+100 ms) so c wins; a saturated executor goes last of the reachable.
    loads = {"b": ann(5), "a": ann(10)}
    assert rank(found, rtt, loads) == ["c", "b", "a", "d"]


def test_rank_falls_back_to_found_order() -> None:
    assert rank(["x", "y", "z"], {}, {}) == ["x", "y", "z"]


def test_load_table_expires() -> None:
    table = LoadTable(max_age=10)
    table.update("p1", ann(1, models=("a", "b")), now=0)  # type: ignore[arg-type]
    table.update("p2", ann(1, models=("a",)), now=5)  # type: ignore[arg-type]
    assert table.models(now=6) == {"a": 2, "b": 1}
    assert list(table.current(now=12)) == ["p2"]


def test_announcement_round_trip_and_rejects() -> None:
    a = ann(3, 16, ("x", "y"))
    assert LoadAnnouncement.decode(a.encode()) == a
    assert a.load == pytest.approx(3 / 16)
    for bad in (
        b"nope",
        b"[]",
        b'{"v": 2}',
        b'{"v":1,"models":"x","active":0,"max":1,"ts":0}',
        b'{"v":1,"models":["bad id"],"active":0,"max":1,"ts":0}',
        b'{"v":1,"models":[],"active":-1,"max":1,"ts":0}',
        b'{"v":1,"models":[],"active":0,"max":1,"ts":"x"}',
    ):
        with pytest.raises(ProtocolError):
            LoadAnnouncement.decode(bad)


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (UsageError("x"), 2),
        (NoExecutorError("x"), 3),
        (AllExecutorsFailed([("p", "why")]), 4),
        (RequestTimeout("x"), 5),
        (PartialResponseError("x"), 6),
        (RemoteError("bad_request", "x"), 7),
        (NetworkError("x"), 1),
    ],
)
def test_exit_codes(exc: Exception, code: int) -> None:
    assert exit_code_for(exc) == code  # type: ignore[arg-type]


def test_retryable() -> None:
    assert retryable(RemoteError("busy", "x"))
    assert retryable(RemoteError("unknown_model", "x"))
    assert not retryable(RemoteError("bad_request", "x"))
    assert not retryable(RemoteError("too_large", "x"))
    assert retryable(NetworkError("x"))
    assert retryable(ProtocolError("x"))
