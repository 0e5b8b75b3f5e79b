"""The executor's settlement loop: a round at once on start, retries while the RPC fails,
rounds on demand, and readiness only after the first round."""

from __future__ import annotations

from typing import cast

import pytest
import trio

from lloom.executor.settle_loop import Trigger, settle_forever
from lloom.executor.settlement import RoundReport, Settler


class FakeSettler:
    """Counts rounds; the first ``failures`` of them fail like an RPC that is down."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.rounds = 0
        self.reached = {n: trio.Event() for n in range(1, 5)}

    def round(self) -> RoundReport:  # runs in a worker thread, as the real one
        self.rounds += 1
        if self.rounds in self.reached:
            trio.from_thread.run_sync(self.reached[self.rounds].set)
        if self.rounds <= self.failures:
            raise ConnectionError("RPC down")
        return RoundReport(sent=[("0xabc", 2)])

    def in_flight(self) -> int:
        return 0


async def test_first_round_runs_at_once_and_readiness_waits_for_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    settler = FakeSettler()
    resumed, trigger = trio.Event(), Trigger()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(settle_forever, cast(Settler, settler), None, 3600.0, trigger, resumed)
        with trio.fail_after(5):  # not the 3600 s interval
            await resumed.wait()
        assert settler.rounds == 1
        assert "settlement sent tx=0xabc records=2" in capsys.readouterr().out
        trigger.fire()
        with trio.fail_after(5):
            await settler.reached[2].wait()
        nursery.cancel_scope.cancel()


async def test_a_failing_first_round_still_lets_the_executor_start_and_is_retried() -> None:
    settler = FakeSettler(failures=2)
    resumed = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(settle_forever, cast(Settler, settler), None, 3600.0, Trigger(), resumed)
        await resumed.wait()
        assert settler.rounds == 1
        with trio.fail_after(10):  # retried every second (BUSY_INTERVAL), not every hour
            await settler.reached[3].wait()
        nursery.cancel_scope.cancel()
