"""Running the :class:`~lloom.executor.settlement.Settler` inside the executor."""

from __future__ import annotations

import logging
import signal

import trio

from lloom.chain.receipts import Domain
from lloom.executor.metrics import ExecutorMetrics
from lloom.executor.receipts import ReceiptBook
from lloom.executor.settlement import Settler

logger = logging.getLogger(__name__)

#: How often a round runs while a settlement is in flight or the RPC is failing.
BUSY_INTERVAL = 1.0
#: How often a round runs while there is no contract to settle on (a reset chain).
HALTED_INTERVAL = 5.0


class Trigger:
    """Wakes the settlement loop early (SIGUSR1, or tests)."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def fire(self) -> None:
        """Run a round now."""
        self._event.set()

    async def wait(self) -> None:
        """Wait until fired, then re-arm."""
        await self._event.wait()
        self._event = trio.Event()


async def on_sigusr1(trigger: Trigger) -> None:
    """Fire ``trigger`` on every SIGUSR1."""
    with trio.open_signal_receiver(signal.SIGUSR1) as signals:
        async for _ in signals:
            logger.info("SIGUSR1: settling now")
            trigger.fire()


async def settle_forever(
    settler: Settler,
    book: ReceiptBook | None,
    interval: float,
    trigger: Trigger,
    resumed: trio.Event | None = None,
    *,
    metrics: ExecutorMetrics | None = None,
) -> None:
    """Settle every ``interval`` seconds, when triggered, and quickly while busy.

    The first round runs at once, to resume whatever a previous run left in flight;
    ``resumed`` is set after it (whether it worked or the RPC is down), so the executor
    can announce readiness with its old settlements already picked up.
    """
    busy = False
    first = True
    halted: str | None = None
    while True:
        if not first:
            wait = HALTED_INTERVAL if halted else BUSY_INTERVAL if busy else interval
            with trio.move_on_after(wait):
                await trigger.wait()
        try:
            busy, reason = await _round(settler, book)
            if reason is not None and reason != halted:  # said loudly, once per state
                logger.error("SETTLEMENT HALTED: %s", reason)
                print(f"settlement halted: {reason}", flush=True)
            elif reason is None and halted is not None:
                logger.warning("settlement resumed: a contract is there again")
                print("settlement resumed", flush=True)
            halted = reason
            if metrics is not None:
                metrics.settlement_halted.set(0 if reason is None else 1)
        except Exception as exc:  # the RPC being down is expected; keep trying
            logger.warning("settlement round failed (will retry): %s", exc)
            busy = True
        finally:
            if first and resumed is not None:
                resumed.set()
            first = False


async def _round(settler: Settler, book: ReceiptBook | None) -> tuple[bool, str | None]:
    """One settlement round; whether settlements are still in flight afterwards, and why
    settlement is halted, if it is."""
    if book is not None and book.domain is None:
        chain_id = await trio.to_thread.run_sync(lambda: settler.w3.eth.chain_id)
        book.domain = Domain(chain_id, settler.contract.address)
    report = await trio.to_thread.run_sync(settler.round)
    for line in report.lines():
        print(line, flush=True)
    busy = await trio.to_thread.run_sync(settler.in_flight) > 0
    return busy, report.halted
