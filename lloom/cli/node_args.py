"""The node flags every role shares, over its ``[node]`` section (:mod:`lloom.node.settings`).

A flag overrides the config file; the file overrides the role's defaults. Written once
here, so a new node-level option is one edit for every role.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from lloom.errors import UsageError
from lloom.node.settings import NodeSettings, load_node_settings


def add_node_args(parser: argparse.ArgumentParser, role: str, *, config_flag: bool = True) -> None:
    """Add the node flags of ``role`` (and ``--config`` unless the role has its own)."""
    group = parser.add_argument_group("network")
    if config_flag:
        group.add_argument(
            "--config",
            metavar="PATH",
            type=Path,
            help="TOML file with a [node] section (flags override it)",
        )
    group.add_argument(
        "--bootstrap-nodes",
        metavar="MULTIADDR,...",
        help="validators to join, each ending in /p2p/<PeerId> (overrides [node].bootstrap)",
    )
    group.add_argument(
        "--listen-address",
        action="append",
        metavar="MULTIADDR",
        help="address to listen on; repeat or comma-separate (overrides [node].listen)",
    )
    group.add_argument(
        "--announce-address",
        action="append",
        metavar="MULTIADDR",
        help="public address to advertise instead of the listen addresses",
    )
    if role == "validator":
        group.add_argument(
            "--no-relay",
            action="store_true",
            help="do not relay for executors behind NAT ([node.relay] enabled = false)",
        )
        return
    if role == "executor":
        group.add_argument(
            "--reachability",
            choices=("auto", "public", "private"),
            help="whether others can dial this executor; auto asks the validators "
            "(overrides [node].reachability)",
        )
    group.add_argument(
        "--mdns",
        action="store_true",
        default=None,
        help="find peers on the LAN by mDNS, also without validators ([node].mdns)",
    )
    group.add_argument(
        "--no-hole-punch",
        action="store_true",
        help="keep relayed connections relayed (no DCUtR; [node].hole_punch = false)",
    )


def _split(values: list[str] | str | None) -> tuple[str, ...] | None:
    if values is None:
        return None
    items = [values] if isinstance(values, str) else values
    return tuple(p.strip() for item in items for p in item.split(",") if p.strip())


def settings_from_args(
    args: argparse.Namespace, role: str, base: NodeSettings | None = None
) -> NodeSettings:
    """The role's node settings: ``base`` (or the ``--config`` file, or the defaults)
    with the flags applied. Raises :class:`UsageError` when the node could find no peer."""
    if base is None:
        base = load_node_settings(getattr(args, "config", None), role)
    settings = base.override(
        bootstrap=_split(args.bootstrap_nodes),
        listen=_split(args.listen_address),
        announce=_split(args.announce_address),
        reachability=getattr(args, "reachability", None),
        mdns=True if getattr(args, "mdns", None) else None,
        hole_punch=False if getattr(args, "no_hole_punch", False) else None,
    )
    if role == "validator" and args.no_relay:
        settings = replace(settings, relay=replace(settings.relay, enabled=False))
    if role != "validator" and not settings.bootstrap and not settings.mdns:
        raise UsageError(
            "no way to find the network: give --bootstrap-nodes (or [node].bootstrap) or --mdns"
        )
    return settings
