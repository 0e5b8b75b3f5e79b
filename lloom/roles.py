"""What every long-running role does around its node: ready line, signals, shutdown."""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import trio

from lloom.node.node import Node
from lloom.readyline import ReadyLine

logger = logging.getLogger(__name__)


def ready_line(node: Node, role: str, extra: tuple[tuple[str, str], ...] = ()) -> ReadyLine:
    """The ready line of ``node``."""
    return ReadyLine(
        role=role,
        peer_id=str(node.peer_id),
        address=node.identity.address,
        listen=tuple(node.listen_multiaddrs()),
        extra=extra,
    )


def announce_ready(line: ReadyLine) -> None:
    """Print the ready line on stdout and flush it."""
    print(line.format(), flush=True)
    sys.stdout.flush()


@contextmanager
def shutdown_signals() -> Iterator[AsyncIterator[int]]:
    """Catch SIGINT and SIGTERM from now on (install before announcing readiness)."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        yield signals


async def wait_for_signal(signals: AsyncIterator[int]) -> int:
    """Wait for the first shutdown signal and return its number."""
    signum = await anext(signals)
    logger.info("received %s, shutting down", signal.Signals(signum).name)
    return signum
