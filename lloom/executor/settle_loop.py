"""Running the :class:`~lloom.executor.settlement.Settler` inside the executor."""

from __future__ import annotations

import logging
import signal

import trio

from lloom.chain.receipts import Domain
from lloom.executor.receipts import ReceiptBook
from lloom.executor.settlement import Settler

logger = logging.getLogger(__name__)

#: How often a round runs while a settlement is in flight or the RPC is failing.
BUSY_INTERVAL = 1.0


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
    settler: Settler, book: ReceiptBook | None, interval: float, trigger: Trigger
) -> None:
    """Settle every ``interval`` seconds, when triggered, and quickly while busy."""
    busy = True  # start with a round: resume whatever a previous run left in flight
    while True:
        with trio.move_on_after(BUSY_INTERVAL if busy else interval):
            await trigger.wait()
        try:
            if book is not None and book.domain is None:
                chain_id = await trio.to_thread.run_sync(lambda: settler.w3.eth.chain_id)
                book.domain = Domain(chain_id, settler.contract.address)
            report = await trio.to_thread.run_sync(settler.round)
            busy = await trio.to_thread.run_sync(settler.in_flight) > 0
        except Exception as exc:  # the RPC being down is expected; keep trying
            logger.warning("settlement round failed (will retry): %s", exc)
            busy = True
            continue
        for line in report.lines():
            print(line, flush=True)
