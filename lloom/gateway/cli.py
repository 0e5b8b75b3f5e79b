"""``lloom-client gateway``: serve the OpenAI API locally, answered by the lloom network."""

from __future__ import annotations

import argparse
import logging

import trio

from lloom import __version__
from lloom.cli.common import EXIT_OK, add_identity_args, identity_from_args, report_error
from lloom.client.loads import follow_loads
from lloom.client.receipts import Ledger, ReceiptSigner
from lloom.errors import LloomError, NetworkError, UsageError
from lloom.gateway.app import build_app
from lloom.gateway.core import Gateway
from lloom.httpserver import start_http
from lloom.identity import Identity
from lloom.logs import configure_logging
from lloom.node.node import NodeConfig, open_node, parse_multiaddr_list
from lloom.paths import default_data_dir
from lloom.roles import announce_ready, ready_line, shutdown_signals, wait_for_signal

logger = logging.getLogger("lloom.gateway")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lloom-client gateway``."""
    parser = argparse.ArgumentParser(
        prog="lloom-client gateway",
        description="Serve an OpenAI-compatible HTTP API answered by the lloom network.",
    )
    add_identity_args(parser)
    parser.add_argument(
        "--listen", default="127.0.0.1:8080", metavar="HOST:PORT", help="HTTP address (port 0: any)"
    )
    parser.add_argument(
        "--bootstrap-nodes",
        required=True,
        metavar="MULTIADDR,...",
        help="validators, each ending in /p2p/<PeerId>",
    )
    parser.add_argument(
        "--timeout", type=float, default=300.0, metavar="SECONDS", help="per-request limit"
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-vv: libp2p too)"
    )
    parser.add_argument("--version", action="version", version=f"lloom {__version__}")
    return parser


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise UsageError(f"--listen must be HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


async def serve(identity: Identity, args: argparse.Namespace) -> None:
    """Run the gateway until SIGINT/SIGTERM."""
    host, port = parse_listen(args.listen)
    config = NodeConfig(
        bootstrap=parse_multiaddr_list(args.bootstrap_nodes, need_peer_id=True), pubsub=True
    )
    ledger = Ledger(default_data_dir() / "client-ledger.sqlite3")
    try:
        with shutdown_signals() as signals:
            async with open_node(identity, config) as node, trio.open_nursery() as nursery:
                if not node.host.get_connected_peers():
                    raise NetworkError("no bootstrap node reachable")
                gateway = Gateway(node, ReceiptSigner(identity, ledger), timeout=args.timeout)
                gateway.nursery = nursery
                nursery.start_soon(follow_loads, node, gateway.loads)
                bound = await start_http(nursery, build_app(gateway), host, port)
                announce_ready(ready_line(node, "gateway", (("http", bound),)))
                logger.info("gateway on http://%s/v1", bound)
                await wait_for_signal(signals)
                await gateway.pool.close()
                nursery.cancel_scope.cancel()
    finally:
        ledger.close()


def main(argv: list[str] | None = None) -> int:
    """Run the gateway; return the exit code."""
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    try:
        identity = identity_from_args(args, role="client")
        trio.run(serve, identity, args)
    except LloomError as exc:
        return report_error(exc)
    return EXIT_OK
