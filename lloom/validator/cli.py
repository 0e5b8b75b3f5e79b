"""``lloom-validator``: a stable bootstrap node and Kademlia DHT server.

It performs no application logic: it keeps the DHT (routing table, provider records)
healthy and answers queries. Several validators bootstrapped to each other form one DHT.
On start it prints a ready line (see :mod:`lloom.readyline`) on stdout; SIGINT or SIGTERM
stops it cleanly with exit code 0.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Awaitable, Callable
from functools import partial

import trio
from libp2p.abc import ISubscriptionAPI

from lloom import __version__
from lloom.cli.common import add_identity_args, identity_from_args, run_main
from lloom.cli.node_args import add_node_args, settings_from_args
from lloom.identity import Identity
from lloom.node.node import NodeConfig, open_node
from lloom.protocol.announce import TOPIC as ANNOUNCE_TOPIC
from lloom.roles import announce_ready, ready_line, run_role, shutdown_signals, wait_for_signal

logger = logging.getLogger("lloom.validator")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lloom-validator``."""
    parser = argparse.ArgumentParser(
        prog="lloom-validator",
        description="Run a lloom validator: a bootstrap node, Kademlia DHT server and relay "
        "for executors behind NAT.",
    )
    add_identity_args(parser)
    add_node_args(parser, "validator")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-vv: libp2p too)"
    )
    parser.add_argument("--version", action="version", version=f"lloom {__version__}")
    return parser


def config_from_args(args: argparse.Namespace) -> NodeConfig:
    """The node configuration a validator runs with: ``--config``'s [node], then flags."""
    return settings_from_args(args, "validator").node_config()


async def serve(identity: Identity, config: NodeConfig) -> None:
    """Run a validator until SIGINT/SIGTERM."""
    with shutdown_signals() as signals:
        async with open_node(identity, config) as node, trio.open_nursery() as nursery:
            if node.pubsub is not None:
                # Validators join the announcement topic so its mesh forms through them.
                subscription = await node.pubsub.subscribe(ANNOUNCE_TOPIC)
                nursery.start_soon(_drain, subscription)
            relay = node.config.relay
            extra = (("relay", "on" if relay else "off"),)
            announce_ready(ready_line(node, "validator", extra))
            logger.info("validator %s (%s) ready", node.peer_id, identity.address)
            await wait_for_signal(signals)
            nursery.cancel_scope.cancel()


async def _drain(subscription: ISubscriptionAPI) -> None:
    """Read and drop relayed messages so the subscription queue never fills."""
    while True:
        await subscription.get()


def main(argv: list[str] | None = None) -> int:
    """Run ``lloom-validator`` with ``argv``; return the exit code."""
    args = build_parser().parse_args(argv)

    def prepare() -> Callable[[], Awaitable[None]]:
        identity = identity_from_args(args, role="validator")
        return partial(serve, identity, config_from_args(args))

    return run_role("validator", args.verbose, prepare)


def run() -> None:
    """Console-script entry point."""
    run_main(main)
