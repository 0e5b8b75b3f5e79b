"""The ``[node]`` section every role shares: how a node joins the network.

One table for validator, executor, client and gateway, read from the role's TOML file
and overridden by its flags (:mod:`lloom.cli.node_args`)::

    [node]
    listen = ["/ip4/0.0.0.0/tcp/4002"]
    announce = []                     # public addresses to advertise instead
    bootstrap = ["/ip4/…/tcp/4001/p2p/…"]
    reachability = "auto"             # executor: "auto" | "public" | "private"
    mdns = false                      # find peers on the LAN without validators
    hole_punch = true                 # DCUtR: upgrade relayed connections to direct
    data_dir = "/var/lib/lloom/executor"

    [node.relay]                      # validator: the relay for executors behind NAT
    enabled = true
    max_reservations = 1024
    …

A key that does not apply to the role (``relay`` on an executor, ``metrics_listen`` on a
validator) is refused with the same one-line error as an unknown key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from lloom.errors import ConfigError, UsageError
from lloom.node.node import NodeConfig, parse_multiaddr_list
from lloom.node.relay import RelaySettings
from lloom.paths import default_data_dir
from lloom.tomlreader import TableReader, load_toml, strings

ROLES = ("validator", "executor", "client", "gateway")

_DEFAULT_LISTEN = {
    "validator": "/ip4/0.0.0.0/tcp/4001",
    "executor": "/ip4/0.0.0.0/tcp/4002",
    # Clients listen too: DCUtR dials from the listen port, and mDNS advertises it.
    "client": "/ip4/0.0.0.0/tcp/0",
    "gateway": "/ip4/0.0.0.0/tcp/0",
}

#: Which keys of ``[node]`` each role reads.
ROLE_KEYS: dict[str, frozenset[str]] = {
    "validator": frozenset({"listen", "announce", "bootstrap", "data_dir", "relay"}),
    "executor": frozenset(
        {
            "listen",
            "announce",
            "bootstrap",
            "reachability",
            "mdns",
            "hole_punch",
            "data_dir",
            "metrics_listen",
        }
    ),
    "client": frozenset({"listen", "announce", "bootstrap", "mdns", "hole_punch", "data_dir"}),
    "gateway": frozenset({"listen", "announce", "bootstrap", "mdns", "hole_punch", "data_dir"}),
}


@dataclass(frozen=True)
class NodeSettings:
    """``[node]``: how a node of one role joins the network."""

    role: str = "executor"
    listen: tuple[str, ...] = ()
    announce: tuple[str, ...] = ()
    bootstrap: tuple[str, ...] = ()
    reachability: str = "auto"
    mdns: bool = False
    hole_punch: bool = True
    data_dir: Path = field(default_factory=default_data_dir)
    #: ``host:port`` of a local HTTP endpoint serving Prometheus ``/metrics`` (off if None).
    metrics_listen: str | None = None
    relay: RelaySettings = field(default_factory=RelaySettings)

    @classmethod
    def defaults(cls, role: str) -> NodeSettings:
        """The settings of ``role`` when nothing is configured."""
        if role not in ROLES:
            raise UsageError(f"unknown role {role!r}")
        # Client and gateway share one data dir: they sign with the same key, and its
        # running totals (the receipt ledger) must be one.
        shared = role in ("client", "gateway")
        return cls(
            role=role,
            listen=(_DEFAULT_LISTEN[role],),
            data_dir=default_data_dir() if shared else default_data_dir() / role,
        )

    def override(self, **changes: Any) -> NodeSettings:
        """These settings with every non-None value of ``changes`` replaced."""
        given = {k: v for k, v in changes.items() if v is not None}
        return replace(self, **given) if given else self

    def node_config(self) -> NodeConfig:
        """The :class:`NodeConfig` to open this role's node with (multiaddrs checked)."""
        validator = self.role == "validator"
        return NodeConfig(
            listen=parse_multiaddr_list(list(self.listen)),
            bootstrap=parse_multiaddr_list(list(self.bootstrap), need_peer_id=True),
            announce=parse_multiaddr_list(list(self.announce)),
            dht_server=validator,
            # A one-shot client does not follow load announcements.
            pubsub=self.role != "client",
            reachability=self.reachability,
            relay=self.relay if validator and self.relay.enabled else None,
            hole_punch=self.hole_punch and not validator,
            mdns=self.mdns,
        )


def _relay(r: TableReader) -> RelaySettings:
    default = RelaySettings()
    values: dict[str, Any] = {"enabled": r.get("enabled", bool, True)}
    for f in fields(RelaySettings):
        if f.name == "enabled":
            continue
        value = r.get(f.name, int, getattr(default, f.name))
        if value < 0:
            raise r.error("must be zero or more", f.name)
        values[f.name] = value
    r.finish()
    try:
        return RelaySettings(**values)
    except UsageError as exc:
        raise r.error(str(exc).removeprefix("relay ")) from None


def parse_node(source: str, table: object, role: str) -> NodeSettings:
    """Parse a ``[node]`` table for ``role``; :class:`ConfigError` naming the field."""
    r = TableReader(source, "node", table)
    allowed = ROLE_KEYS[role]
    for key in r.table:
        if key not in allowed:
            known = any(key in keys for keys in ROLE_KEYS.values())
            hint = f" (a {role} does not use it)" if known else ""
            raise r.error(f"unknown field '{key}'{hint}")
    base = NodeSettings.defaults(role)
    data_dir = r.get("data_dir", str, None)
    reachability = r.get("reachability", str, base.reachability)
    if reachability not in ("auto", "public", "private"):
        raise r.error("must be 'auto', 'public' or 'private'", "reachability")
    metrics = r.get("metrics_listen", str, None)
    if metrics is not None and not re.fullmatch(r".+:\d{1,5}", metrics):
        raise r.error("must be HOST:PORT", "metrics_listen")
    relay_table = r.get("relay", dict, None)
    settings = NodeSettings(
        role=role,
        listen=strings(r, "listen", base.listen),
        announce=strings(r, "announce", ()),
        bootstrap=strings(r, "bootstrap", ()),
        reachability=reachability,
        mdns=r.get("mdns", bool, False),
        hole_punch=r.get("hole_punch", bool, True),
        data_dir=Path(data_dir).expanduser() if data_dir else base.data_dir,
        metrics_listen=metrics,
        relay=_relay(TableReader(source, r.child("relay"), relay_table))
        if relay_table is not None
        else base.relay,
    )
    r.finish()
    return settings


def load_node_settings(path: Path | None, role: str) -> NodeSettings:
    """The ``[node]`` section of the role's config file (defaults without a file).

    The file of a validator, client or gateway holds only ``[node]``.
    """
    if path is None:
        return NodeSettings.defaults(role)
    doc = load_toml(path)
    r = TableReader(str(path), "", doc)
    settings = parse_node(str(path), r.get("node", dict, {}), role)
    try:
        r.finish()
    except ConfigError as exc:
        raise ConfigError(f"{exc} (a {role}'s config file holds only [node])") from None
    return settings
