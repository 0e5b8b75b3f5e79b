"""``lloom-executor``: serve OpenAI-format requests from configured backends.

It joins the network through validators, provides the executor role key and one key per
served model (re-provided periodically), publishes its load on gossipsub, serves
``/lloom/llm/1.0.0`` and stores the usage of every completed request in SQLite. It prints
a ready line once announced; SIGINT/SIGTERM stop it cleanly.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from lloom import __version__
from lloom.cli.common import add_identity_args, identity_from_args, run_main
from lloom.cli.node_args import add_node_args, settings_from_args
from lloom.errors import NetworkError
from lloom.executor.backend import OpenAIBackend, client_shards
from lloom.executor.config import ExecutorConfig, load_config
from lloom.executor.handler import Backend, RequestHandler
from lloom.executor.receipts import ReceiptBook
from lloom.executor.server import announce_keys, install, keep_announcing
from lloom.executor.usage import AsyncUsageStore, UsageStore
from lloom.httpserver import start_http
from lloom.identity import Identity
from lloom.node.lanrecord import pack_list
from lloom.node.node import NodeConfig, open_node
from lloom.roles import announce_ready, ready_line, run_role, shutdown_signals, wait_for_signal
from lloom.tokens import ensure_offline_encodings

if TYPE_CHECKING:  # web3 costs ~10 MB of RSS: imported only with a [chain] section
    from lloom.executor.settlement import Settler

logger = logging.getLogger("lloom.executor")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lloom-executor``."""
    parser = argparse.ArgumentParser(
        prog="lloom-executor",
        description="Run a lloom executor: serve LLM requests from OpenAI-compatible backends.",
    )
    add_identity_args(parser)
    parser.add_argument("--config", required=True, metavar="PATH", help="the config.toml")
    add_node_args(parser, "executor", config_flag=False)
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-vv: libp2p too)"
    )
    parser.add_argument("--version", action="version", version=f"lloom {__version__}")
    return parser


def node_config(args: argparse.Namespace, config: ExecutorConfig) -> NodeConfig:
    """The node settings: flags override the config file's [node]."""
    node = settings_from_args(args, "executor", base=config.node).node_config()
    # What it serves, for clients on the LAN (mDNS); the DHT has its own announcements.
    node.lan_properties = {"role": "executor", **pack_list("models", config.served_models())}
    return node


async def serve(identity: Identity, config: ExecutorConfig, node_cfg: NodeConfig) -> None:
    """Run the executor until SIGINT/SIGTERM."""
    ensure_offline_encodings(config.node.data_dir / "tiktoken")
    store = UsageStore(config.node.data_dir / "usage.sqlite3")
    if broken := store.close_open():
        logger.warning(
            "%d answer(s) were cut off when this executor last stopped; kept as partial usage",
            broken,
        )
    try:
        with shutdown_signals() as signals:
            async with contextlib.AsyncExitStack() as clients:
                http = [
                    await clients.enter_async_context(client)
                    for client in client_shards(config.limits.max_concurrent_requests)
                ]
                backends: dict[str, Backend] = {}
                for spec in config.backends:
                    backend = OpenAIBackend(spec, http)
                    for model in spec.models:
                        backends.setdefault(model, backend)
                book, settler = chain_parts(identity, config, store)
                if book is not None and settler is not None:
                    await learn_domain(book, settler)
                handler = RequestHandler(
                    backends,
                    AsyncUsageStore(store),
                    config.limits,
                    book,
                    remote_media_models=frozenset(
                        m for b in config.backends if b.allow_remote_media for m in b.models
                    ),
                )
                async with open_node(identity, node_cfg) as node, trio.open_nursery() as nursery:
                    install(node, handler)
                    if settler is not None and config.chain is not None:
                        from lloom.executor.settle_loop import (  # noqa: PLC0415
                            Trigger,
                            on_sigusr1,
                            settle_forever,
                        )

                        trigger = Trigger()
                        resumed = trio.Event()
                        nursery.start_soon(on_sigusr1, trigger)
                        nursery.start_soon(
                            partial(settle_forever, metrics=handler.metrics),
                            settler,
                            book,
                            config.chain.batch_interval_secs,
                            trigger,
                            resumed,
                        )
                        # Ready only once a previous run's settlements are picked up.
                        await resumed.wait()
                    with_validators = bool(node_cfg.bootstrap)
                    if with_validators and not node.host.get_connected_peers():
                        raise NetworkError("no bootstrap node reachable")
                    await node.make_reachable(nursery)
                    # Without validators (mDNS only) the LAN record is the announcement.
                    if with_validators and await announce_keys(node, handler.models) == 0:
                        raise NetworkError("no validator accepted the executor's announcements")
                    nursery.start_soon(keep_announcing, node, handler)
                    extra = [("models", ",".join(handler.models))]
                    if config.node.metrics_listen is not None:
                        host, _, port = config.node.metrics_listen.rpartition(":")
                        bound = await start_http(
                            nursery, handler.metrics.app(), host.strip("[]"), int(port)
                        )
                        extra.append(("metrics", bound))
                    announce_ready(ready_line(node, "executor", tuple(extra)))
                    logger.info("executor %s serving %s", node.peer_id, ", ".join(handler.models))
                    await wait_for_signal(signals)
                    nursery.cancel_scope.cancel()
    finally:
        store.close()


async def learn_domain(book: ReceiptBook, settler: Settler) -> None:
    """Ask the chain for its id, so receipts can be asked for from the first request."""
    from lloom.chain.receipts import Domain  # noqa: PLC0415

    try:  # bounded by the HTTP provider's timeout
        chain_id = await trio.to_thread.run_sync(lambda: settler.w3.eth.chain_id)
    except Exception as exc:  # RPC down: the settlement loop learns it later
        logger.warning("chain RPC unreachable (%s); receipts start once it answers", exc)
        return
    book.domain = Domain(chain_id, settler.contract.address)


def chain_parts(
    identity: Identity, config: ExecutorConfig, store: UsageStore
) -> tuple[ReceiptBook | None, Settler | None]:
    """The receipt book and settler of a ``[chain]`` config (none without one)."""
    chain = config.chain
    if chain is None:
        return None, None
    from lloom.chain.contract import connect  # noqa: PLC0415
    from lloom.executor.settlement import Settler  # noqa: PLC0415

    settler = Settler(
        store,
        identity,
        connect(chain.rpc_url),
        chain.contract_address,
        mode=chain.mode,
        confirmations=chain.confirmations,
    )
    if chain.mode != "verified":
        return None, settler
    # The domain (chain id) is learnt by the first settlement round: receipts are asked for
    # from then on, so the executor serves even while the RPC is down.
    return ReceiptBook(store, identity.address, max_unsigned=chain.max_unsigned_requests), settler


def main(argv: list[str] | None = None) -> int:
    """Run ``lloom-executor`` with ``argv``; return the exit code."""
    args = build_parser().parse_args(argv)

    def prepare() -> Callable[[], Awaitable[None]]:
        identity = identity_from_args(args, role="executor")
        config = load_config(Path(args.config))
        node_cfg = node_config(args, config)
        return partial(serve, identity, config, node_cfg)

    return run_role("executor", args.verbose, prepare)


def run() -> None:
    """Console-script entry point."""
    run_main(main)
