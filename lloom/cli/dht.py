"""``lloom dht``: look into the DHT from the command line.

- ``lloom dht providers`` finds the providers of a key (the executor role, a model, or any
  name), optionally dials each and measures a ping, and prints them.
- ``lloom dht provide`` announces a key and keeps announcing it until stopped, printing a
  ready line; a diagnostic tool to check that a network answers lookups.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import trio
from libp2p.peer.peerinfo import PeerInfo

from lloom.cli.common import add_identity_args, identity_from_args
from lloom.dhtkeys import EXECUTOR_ROLE_NAME, cid_key, cid_string, model_key_name
from lloom.errors import DialError, NetworkError, UsageError
from lloom.identity import Identity
from lloom.node.node import Node, NodeConfig, open_node, parse_multiaddr_list
from lloom.node.relay import is_circuit
from lloom.roles import announce_ready, ready_line, shutdown_signals, wait_for_signal


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``dht providers`` and ``dht provide`` to the ``lloom`` parser."""
    dht = sub.add_parser("dht", help="inspect the DHT: find or announce providers")
    dsub = dht.add_subparsers(dest="dht_command", required=True, metavar="SUBCOMMAND")

    find = dsub.add_parser("providers", help="find the providers of a key")
    _add_common(find)
    find.add_argument("--dial", action="store_true", help="dial and ping every provider")
    find.add_argument("--timeout", type=float, default=10.0, help="lookup timeout (s)")
    find.add_argument("--json", action="store_true", help="print JSON")

    provide = dsub.add_parser("provide", help="announce a key until stopped")
    _add_common(provide)
    provide.add_argument("--listen-address", default="/ip4/127.0.0.1/tcp/0", metavar="MULTIADDR")
    provide.add_argument(
        "--interval", type=float, default=60.0, help="seconds between re-announcements"
    )


def _add_common(p: argparse.ArgumentParser) -> None:
    add_identity_args(p)
    p.add_argument(
        "--bootstrap-nodes",
        required=True,
        metavar="MULTIADDR,...",
        help="validators to ask, each ending in /p2p/<PeerId>",
    )
    what = p.add_mutually_exclusive_group()
    what.add_argument("--model", help="the key of executors serving this model")
    what.add_argument("--name", help=f"any key name (default {EXECUTOR_ROLE_NAME})")


def key_name(args: argparse.Namespace) -> str:
    """The key name selected by ``--model`` / ``--name``."""
    if args.model:
        return model_key_name(args.model)
    return str(args.name or EXECUTOR_ROLE_NAME)


def _identity(args: argparse.Namespace) -> Identity:
    if args.private_key is None and args.key_file is None:
        return Identity.generate()  # lookups need no stable identity
    return identity_from_args(args)


async def find_providers(args: argparse.Namespace) -> int:
    """Run ``lloom dht providers``."""
    name = key_name(args)
    key = cid_key(name)
    config = NodeConfig(bootstrap=parse_multiaddr_list(args.bootstrap_nodes, need_peer_id=True))
    async with open_node(_identity(args), config) as node:
        if not node.host.get_connected_peers():
            raise NetworkError("no bootstrap node reachable")
        start = time.perf_counter()
        found = await node.dht.find_providers(key, timeout=args.timeout)
        lookup_ms = (time.perf_counter() - start) * 1000
        rows = [await _describe(node, info, args.dial) for info in found]
    if args.json:
        print(
            json.dumps(
                {
                    "key": name,
                    "cid": cid_string(key),
                    "lookup_ms": round(lookup_ms, 2),
                    "providers": rows,
                }
            )
        )
    else:
        print(f"{len(rows)} provider(s) of {name} ({cid_string(key)}) in {lookup_ms:.1f} ms")
        for row in rows:
            extra = f"  {row['path']}"
            extra += f"  ping {row['ping_ms']} ms" if "ping_ms" in row else ""
            error = f"  unreachable: {row['error']}" if "error" in row else ""
            print(f"  {row['peer_id']}{extra}{error}")
            for addr in row["addrs"]:
                print(f"    {addr}")
    return 0 if rows else 1


async def _describe(node: Node, info: PeerInfo, dial: bool) -> dict[str, Any]:
    relayed = bool(info.addrs) and all(is_circuit(a) for a in info.addrs)
    row: dict[str, Any] = {
        "peer_id": str(info.peer_id),
        "addrs": [str(a) for a in info.addrs],
        "path": "relayed" if relayed else "direct",
    }
    if dial:
        try:
            await node.connect(info)
            row["ping_ms"] = round(await node.ping(info.peer_id) * 1000, 2)
            row["path"] = node.path_to(info.peer_id) or row["path"]
        except (DialError, trio.TooSlowError, NetworkError) as exc:
            row["error"] = str(exc)
    return row


async def provide(args: argparse.Namespace) -> int:
    """Run ``lloom dht provide``."""
    if args.interval <= 0:
        raise UsageError("--interval must be positive")
    key = cid_key(key_name(args))
    config = NodeConfig(
        listen=parse_multiaddr_list(args.listen_address),
        bootstrap=parse_multiaddr_list(args.bootstrap_nodes, need_peer_id=True),
    )
    with shutdown_signals() as signals:
        async with open_node(_identity(args), config) as node, trio.open_nursery() as nursery:
            if not await node.dht.provide(key):
                raise NetworkError("no DHT server accepted the provider record")
            announce_ready(ready_line(node, "provider", (("key", cid_string(key)),)))

            async def reannounce() -> None:
                while True:
                    await trio.sleep(args.interval)
                    await node.dht.provide(key)

            nursery.start_soon(reannounce)
            await wait_for_signal(signals)
            nursery.cancel_scope.cancel()
    return 0
