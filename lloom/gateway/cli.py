"""``lloom-client gateway``: serve the OpenAI API locally, answered by the lloom network."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import trio

from lloom import __version__
from lloom.cli.common import (
    add_identity_args,
    identity_from_args,
)
from lloom.cli.keys import default_key_usage_path
from lloom.cli.node_args import add_node_args, settings_from_args
from lloom.client.loads import follow_loads
from lloom.client.network import NetworkClient
from lloom.client.observed import EXECUTOR_BOOK, ExecutorBook
from lloom.client.options import (
    add_chain_args,
    add_choice_args,
    choice_from_args,
    domain_from_args,
)
from lloom.client.receipts import Ledger, ReceiptSigner
from lloom.errors import NetworkError, UsageError
from lloom.gateway.app import Access, build_app
from lloom.gateway.guard import AccessPolicy, is_loopback
from lloom.gateway.keys import ENV_KEYS, KeyUsage, load_keys
from lloom.httpserver import start_http
from lloom.identity import Identity
from lloom.node.node import open_node
from lloom.roles import announce_ready, ready_line, run_role, shutdown_signals, wait_for_signal

logger = logging.getLogger("lloom.gateway")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lloom-client gateway``."""
    parser = argparse.ArgumentParser(
        prog="lloom-client gateway",
        description="Serve an OpenAI-compatible HTTP API answered by the lloom network.",
    )
    add_identity_args(parser)
    add_chain_args(parser)
    add_choice_args(parser)
    parser.add_argument(
        "--listen", default="127.0.0.1:8080", metavar="HOST:PORT", help="HTTP address (port 0: any)"
    )
    add_node_args(parser, "gateway")
    parser.add_argument(
        "--timeout", type=float, default=300.0, metavar="SECONDS", help="per-request limit"
    )
    parser.add_argument(
        "--api-key",
        metavar="KEY",
        help=f"accept this API key (named 'default'; visible in the process list: prefer "
        f"${ENV_KEYS} or --keys-file)",
    )
    parser.add_argument(
        "--keys-file",
        type=Path,
        metavar="PATH",
        help="TOML file of named API keys with their limits (mode 0600; lloom keys new)",
    )
    parser.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also accept requests whose Host header names NAME (repeatable)",
    )
    parser.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="accept browser requests from ORIGIN, e.g. https://app.example (repeatable)",
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


def access_from_args(args: argparse.Namespace, host: str, usage: KeyUsage | None) -> Access:
    """The gateway's access rules; refuses to listen beyond loopback without keys."""
    keys = load_keys(args.api_key, args.keys_file, os.environ)
    if not keys and not is_loopback(host):
        raise UsageError(
            f"refusing to listen on {host} without API keys: anyone who reaches it would spend "
            f"this gateway's key. Give keys (--keys-file, ${ENV_KEYS} or --api-key), or "
            "listen on 127.0.0.1"
        )
    return Access(AccessPolicy.for_listen(host, args.allow_host, args.allow_origin), keys, usage)


async def serve(identity: Identity, args: argparse.Namespace) -> None:
    """Run the gateway until SIGINT/SIGTERM."""
    host, port = parse_listen(args.listen)
    key_usage = KeyUsage(default_key_usage_path())
    try:
        access = access_from_args(args, host, key_usage)
        await _serve(identity, args, host, port, access)
    finally:
        key_usage.close()


async def _serve(
    identity: Identity, args: argparse.Namespace, host: str, port: int, access: Access
) -> None:
    settings = settings_from_args(args, "gateway")
    config = settings.node_config()
    ledger = Ledger(settings.data_dir / "client-ledger.sqlite3")
    book = ExecutorBook(settings.data_dir / EXECUTOR_BOOK)
    try:
        with shutdown_signals() as signals:
            async with open_node(identity, config) as node, trio.open_nursery() as nursery:
                if config.bootstrap and not node.host.get_connected_peers():
                    raise NetworkError("no bootstrap node reachable")
                signer = ReceiptSigner(identity, ledger, domain_from_args(args))
                choice = choice_from_args(args, book)
                gateway = NetworkClient(node, signer, timeout=args.timeout, choice=choice)
                gateway.nursery = nursery
                nursery.start_soon(follow_loads, node, gateway.loads)
                nursery.start_soon(_keep_saving, book)
                bound = await start_http(nursery, build_app(gateway, access=access), host, port)
                announce_ready(ready_line(node, "gateway", (("http", bound),)))
                logger.info("gateway on http://%s/v1", bound)
                await wait_for_signal(signals)
                await gateway.pool.close()
                nursery.cancel_scope.cancel()
    finally:
        ledger.close()
        book.save()


async def _keep_saving(book: ExecutorBook, every: float = 30.0) -> None:
    """Write what was observed of executors every ``every`` seconds."""
    while True:
        await trio.sleep(every)
        await trio.to_thread.run_sync(book.save)


def main(argv: list[str] | None = None) -> int:
    """Run the gateway; return the exit code."""
    args = build_parser().parse_args(argv)

    def prepare() -> Callable[[], Awaitable[None]]:
        identity = identity_from_args(args, role="client")
        return partial(serve, identity, args)

    return run_role("gateway", args.verbose, prepare)
