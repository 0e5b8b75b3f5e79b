"""What every long-running role does around its node: errors and exit codes, ready line,
signals, shutdown. A role's ``main`` is ``run_role(role, verbose, prepare)``: ``prepare``
parses and loads everything (key, config) and returns the coroutine function to run."""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager

import trio

from lloom.cli.common import EXIT_FAILURE, EXIT_OK, report_error
from lloom.errors import LloomError
from lloom.logs import configure_logging
from lloom.node.node import Node
from lloom.readyline import ReadyLine

logger = logging.getLogger(__name__)


def run_role(role: str, verbose: int, prepare: Callable[[], Callable[[], Awaitable[None]]]) -> int:
    """Configure logging, ``prepare`` the role and run it under trio; return the exit code
    (a :class:`LloomError` is one line on stderr with its own exit code)."""
    configure_logging(verbose)
    try:
        trio.run(prepare())
    except LloomError as exc:
        return report_error(exc)
    except OSError as exc:
        logger.error("cannot run the %s: %s", role, exc)
        return EXIT_FAILURE
    return EXIT_OK


def ready_line(node: Node, role: str, extra: tuple[tuple[str, str], ...] = ()) -> ReadyLine:
    """The ready line of ``node`` (with ``path=direct|relayed`` once it is known)."""
    path = (("path", node.path),) if node.path else ()
    return ReadyLine(
        role=role,
        peer_id=str(node.peer_id),
        address=node.identity.address,
        listen=tuple(node.listen_multiaddrs()),
        extra=path + extra,
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
