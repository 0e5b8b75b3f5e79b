"""``lloom-validator``: a stable bootstrap node and Kademlia DHT server.

It performs no application logic: it keeps the DHT (routing table, provider records)
healthy and answers queries. Several validators bootstrapped to each other form one DHT.
On start it prints a ready line (see :mod:`lloom.readyline`) on stdout; SIGINT or SIGTERM
stops it cleanly with exit code 0.
"""

from __future__ import annotations

import argparse
import logging

import trio
from libp2p.abc import ISubscriptionAPI

from lloom import __version__
from lloom.cli.common import (
    EXIT_FAILURE,
    EXIT_OK,
    add_identity_args,
    identity_from_args,
    report_error,
    run_main,
)
from lloom.errors import LloomError
from lloom.identity import Identity
from lloom.logs import configure_logging
from lloom.node.node import NodeConfig, open_node, parse_multiaddr_list
from lloom.protocol.announce import TOPIC as ANNOUNCE_TOPIC
from lloom.roles import announce_ready, ready_line, shutdown_signals, wait_for_signal

logger = logging.getLogger("lloom.validator")

DEFAULT_LISTEN = "/ip4/0.0.0.0/tcp/4001"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lloom-validator``."""
    parser = argparse.ArgumentParser(
        prog="lloom-validator",
        description="Run a lloom validator: a bootstrap node and Kademlia DHT server.",
    )
    add_identity_args(parser)
    parser.add_argument(
        "--listen-address",
        action="append",
        metavar="MULTIADDR",
        help=f"address to listen on; repeat or comma-separate for several "
        f"(default {DEFAULT_LISTEN})",
    )
    parser.add_argument(
        "--bootstrap-nodes",
        metavar="MULTIADDR,...",
        default="",
        help="other validators to join, each ending in /p2p/<PeerId>",
    )
    parser.add_argument(
        "--announce-address",
        action="append",
        metavar="MULTIADDR",
        help="public address to advertise instead of the listen addresses (behind NAT)",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-vv: libp2p too)"
    )
    parser.add_argument("--version", action="version", version=f"lloom {__version__}")
    return parser


def config_from_args(args: argparse.Namespace) -> NodeConfig:
    """The node configuration a validator runs with."""
    return NodeConfig(
        listen=parse_multiaddr_list(args.listen_address or [DEFAULT_LISTEN]),
        bootstrap=parse_multiaddr_list(args.bootstrap_nodes, need_peer_id=True),
        announce=parse_multiaddr_list(args.announce_address or []),
        dht_server=True,
        pubsub=True,
    )


async def serve(identity: Identity, config: NodeConfig) -> None:
    """Run a validator until SIGINT/SIGTERM."""
    with shutdown_signals() as signals:
        async with open_node(identity, config) as node, trio.open_nursery() as nursery:
            if node.pubsub is not None:
                # Validators join the announcement topic so its mesh forms through them.
                subscription = await node.pubsub.subscribe(ANNOUNCE_TOPIC)
                nursery.start_soon(_drain, subscription)
            announce_ready(ready_line(node, "validator"))
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
    configure_logging(args.verbose)
    try:
        identity = identity_from_args(args, role="validator")
        config = config_from_args(args)
        trio.run(serve, identity, config)
    except LloomError as exc:
        return report_error(exc)
    except OSError as exc:
        logger.error("cannot run the validator: %s", exc)
        return EXIT_FAILURE
    return EXIT_OK


def run() -> None:
    """Console-script entry point."""
    run_main(main)
