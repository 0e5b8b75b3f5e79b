"""Multi-host network topologies on one machine, for tests: Linux network namespaces.

A :class:`Topology` builds, as root, with ``ip`` and ``nft``:

- **hosts**: one network namespace each, ``lo`` up;
- **subnets**: a Linux bridge (``br0``, multicast snooping off so multicast such as mDNS
  floods like on a dumb switch) living in a namespace of its own, so nothing is ever
  added to or routed through the root namespace;
- **links**: a veth pair from a host (``eth0``, ``eth1``… inside the host) to a subnet's
  bridge (``p1``, ``p2``… inside the bridge namespace) with a static IPv4 address;
- **NAT routers**: a host with ``eth0`` on a public subnet and ``eth1`` on a private one,
  ``ip_forward=1``, nftables ``masquerade`` of the private subnet out of ``eth0`` and,
  with ``block_inbound``, ``iifname "eth0" ct state new drop`` (a home router: nothing
  from outside gets in, except ports forwarded with :meth:`Topology.forward_port`).
  Hosts made with :meth:`Topology.behind` get a default route via the router.

Names: every namespace is called ``lln-<pid>-<tag>-<label>`` (``tag`` four random hex
digits), so parallel runs never clash and :func:`cleanup_stale` can tell the leftovers of
a dead test process from a live run's namespaces. Interface names are short and live only
inside the topology's own namespaces, so they cannot clash with anything either.
Subnets are /24s picked at random from 10.16.0.0/24 to 10.254.255.0/24, never overlapping an
address or route of the root namespace.

Processes run inside a host with ``ip netns exec NAME argv…``, which execs the program:
the PID of the ``Popen`` is the program's, so :class:`tests.support.procs.Processes`
stops it by PID as usual::

    with topology() as net:
        lan = net.subnet("lan")
        a, b = net.host("a", lan), net.host("b", lan)
        proc = procs.start("server", netns_argv(a, [sys.executable, "-m", "http.server"]))

Everything is torn down on exit, also when the body or the build failed: processes the
topology started itself are killed, then every namespace it made is deleted (a veth pair
and a bridge go with their namespace).
"""

from __future__ import annotations

import functools
import ipaddress
import json
import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Literal

#: Every namespace a topology makes is called ``lln-<pid>-<tag>-<label>``.
NAME_PREFIX = "lln"
_STALE = re.compile(rf"^{NAME_PREFIX}-(\d+)-[0-9a-f]{{4}}-")
_LABEL = re.compile(r"^[a-z0-9][a-z0-9-]{0,19}$")
#: The IPv4 multicast range; hosts route it out of their first link (mDNS needs it).
MULTICAST = "224.0.0.0/4"


class NetnsError(RuntimeError):
    """A topology command failed."""


def _cmd(argv: Sequence[str], *, stdin: str | None = None, timeout: float = 10.0) -> str:
    """Run a setup command; its stdout, or :class:`NetnsError` with its stderr."""
    done = subprocess.run(
        list(argv), input=stdin, capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def _ip(ns: str | None, *args: str) -> str:
    """``ip [-n ns] args…``."""
    return _cmd(["ip", *(["-n", ns] if ns else []), *args])


@dataclass(eq=False)
class Subnet:
    """A bridge (``br0``) in its own namespace: one broadcast domain, a /24."""

    label: str
    ns: str
    network: ipaddress.IPv4Network
    _used: set[ipaddress.IPv4Address] = field(default_factory=set, repr=False, init=False)
    _ports: int = field(default=0, repr=False, init=False)

    def take_address(self, address: str | None = None) -> ipaddress.IPv4Address:
        """Reserve ``address``, or the lowest free one (.1, .2, … as links are made)."""
        if address is None:
            free = (a for a in self.network.hosts() if a not in self._used)
            ip = next(free, None)
            if ip is None:
                raise NetnsError(f"subnet {self.label} is full")
        else:
            ip = ipaddress.IPv4Address(address)
            if ip not in self.network or ip in (self.network[0], self.network[-1]):
                raise ValueError(f"{ip} is not a host address of {self.network}")
            if ip in self._used:
                raise ValueError(f"{ip} is already used on subnet {self.label}")
        self._used.add(ip)
        return ip

    def next_port(self) -> str:
        """A new bridge-port name, unique within the bridge namespace."""
        self._ports += 1
        return f"p{self._ports}"


@dataclass(eq=False)
class Link:
    """A host's veth on a subnet: ``dev`` inside the host, ``port`` on the bridge."""

    host: Host
    subnet: Subnet
    dev: str
    port: str
    interface: ipaddress.IPv4Interface
    #: The default route of the host goes via this address on this link, when set.
    gateway: str | None = None
    #: Multicast (224.0.0.0/4) is routed out of this link.
    multicast: bool = False

    @property
    def ip(self) -> str:
        """The host's address on this link."""
        return str(self.interface.ip)


@dataclass(eq=False)
class Host:
    """A network namespace with ``lo`` up and links to subnets."""

    label: str
    ns: str
    links: list[Link] = field(default_factory=list)

    @property
    def ip(self) -> str:
        """The address of the first link."""
        if not self.links:
            raise NetnsError(f"host {self.label} has no link")
        return self.links[0].ip

    def link_to(self, subnet: Subnet) -> Link:
        """The link to ``subnet``."""
        for link in self.links:
            if link.subnet is subnet:
                return link
        raise NetnsError(f"host {self.label} has no link to {subnet.label}")

    def ip_on(self, subnet: Subnet) -> str:
        """The host's address on ``subnet``."""
        return self.link_to(subnet).ip


@dataclass(eq=False)
class Router:
    """A NAT router: ``public`` link (``eth0``) and ``private`` link (``eth1``)."""

    host: Host
    public: Link
    private: Link
    block_inbound: bool

    @property
    def public_ip(self) -> str:
        """What hosts behind the router are seen as from outside."""
        return self.public.ip

    @property
    def private_ip(self) -> str:
        """The default gateway of hosts behind the router."""
        return self.private.ip


def netns_argv(host: Host | str, argv: Sequence[str]) -> list[str]:
    """``argv`` run inside ``host``'s namespace (``ip netns exec`` execs it: same PID)."""
    ns = host if isinstance(host, str) else host.ns
    return ["ip", "netns", "exec", ns, *argv]


def _root_networks() -> list[ipaddress.IPv4Network]:
    """Networks of the root namespace's IPv4 addresses and routes."""
    nets: list[ipaddress.IPv4Network] = []
    for entry in json.loads(_ip(None, "-j", "-4", "addr") or "[]"):
        for info in entry.get("addr_info", []):
            local, plen = info.get("local"), info.get("prefixlen")
            if local is not None and plen is not None:
                nets.append(ipaddress.IPv4Network(f"{local}/{plen}", strict=False))
    for route in json.loads(_ip(None, "-j", "-4", "route") or "[]"):
        dst = route.get("dst", "default")
        if dst != "default":
            nets.append(ipaddress.IPv4Network(dst, strict=False))
    return nets


def _namespaces() -> list[str]:
    """Names of the existing network namespaces."""
    return [line.split()[0] for line in _cmd(["ip", "netns", "list"]).splitlines() if line]


def _alive(pid: int) -> bool:
    """True if a process with this PID exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale() -> list[str]:
    """Delete topology namespaces whose test process is gone (left by a killed run);
    return their names. Namespaces of live processes are never touched."""
    removed = []
    for ns in _namespaces():
        match = _STALE.match(ns)
        if match and not _alive(int(match.group(1))):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
            removed.append(ns)
    return removed


@functools.cache
def available() -> str | None:
    """Why topologies cannot be built here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool, package in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return f"`{tool}` is missing (Debian package {package}; make sysdeps installs it)"
    probe = f"{NAME_PREFIX}-{os.getpid()}-{secrets.token_hex(2)}-probe"
    try:
        _cmd(["ip", "netns", "add", probe])
        try:
            _ip(probe, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
            _ip(probe, "link", "add", "br0", "type", "bridge")
            _cmd(["ip", "netns", "exec", probe, "nft", "add", "table", "ip", "probe"])
        finally:
            subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    except (NetnsError, OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot build network namespaces here: {exc}"
    return None


class Topology:
    """Hosts, subnets and NAT routers in network namespaces; :meth:`close` removes all."""

    def __init__(self) -> None:
        self.tag = secrets.token_hex(2)
        self.prefix = f"{NAME_PREFIX}-{os.getpid()}-{self.tag}-"
        self.hosts: dict[str, Host] = {}
        self.subnets: dict[str, Subnet] = {}
        self.routers: dict[str, Router] = {}
        self._namespaces: list[str] = []
        self._taken: list[ipaddress.IPv4Network] = []
        self._popens: list[subprocess.Popen[bytes]] = []
        self._dnat = 0

    # --- building -------------------------------------------------------------------

    def _new_ns(self, label: str) -> str:
        """Create a namespace for ``label`` with ``lo`` up."""
        if not _LABEL.match(label):
            raise ValueError(f"label {label!r}: lower-case letters, digits, '-', ≤ 20 chars")
        ns = self.prefix + label
        if ns in self._namespaces:
            raise ValueError(f"label {label!r} is already used in this topology")
        _cmd(["ip", "netns", "add", ns])
        self._namespaces.append(ns)
        _ip(ns, "link", "set", "lo", "up")
        return ns

    def _pick_network(self) -> ipaddress.IPv4Network:
        """A random 10.x.y.0/24 clear of the root namespace and of this topology."""
        avoid = _root_networks() + self._taken
        for _ in range(1000):
            net = ipaddress.IPv4Network(
                f"10.{secrets.randbelow(239) + 16}.{secrets.randbelow(256)}.0/24"
            )
            if not any(net.overlaps(other) for other in avoid):
                return net
        raise NetnsError("no free 10.x.y.0/24 found")

    def subnet(self, label: str, network: str | None = None) -> Subnet:
        """A new subnet (a bridge in namespace ``<prefix>sw-<label>``), a random /24
        unless ``network`` is given."""
        net = ipaddress.IPv4Network(network) if network else self._pick_network()
        if any(net.overlaps(other) for other in self._taken):
            raise ValueError(f"{net} overlaps a subnet of this topology")
        ns = self._new_ns(f"sw-{label}")
        _ip(ns, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        _ip(ns, "link", "set", "br0", "up")
        self._taken.append(net)
        subnet = self.subnets[label] = Subnet(label, ns, net)
        return subnet

    def host(self, label: str, *subnets: Subnet) -> Host:
        """A new host, linked to each of ``subnets`` (next free address on each)."""
        host = self.hosts[label] = Host(label, self._new_ns(label))
        for subnet in subnets:
            self.attach(host, subnet)
        return host

    def attach(
        self,
        host: Host,
        subnet: Subnet,
        address: str | None = None,
        *,
        gateway: str | None = None,
        multicast: bool | None = None,
    ) -> Link:
        """Link ``host`` to ``subnet`` with ``address`` (default: the next free one).

        ``gateway``: the host's default route goes via this address on the link.
        ``multicast``: route 224.0.0.0/4 out of this link; by default the first link
        of a host without a gateway does (a sendto to an mDNS group needs a route).
        """
        ip = subnet.take_address(address)
        dev, port = f"eth{len(host.links)}", subnet.next_port()
        if multicast is None:
            multicast = not host.links and gateway is None
        link = Link(
            host,
            subnet,
            dev,
            port,
            ipaddress.IPv4Interface(f"{ip}/{subnet.network.prefixlen}"),
            gateway,
            multicast,
        )
        _ip(host.ns, "link", "add", dev, "type", "veth", "peer", "name", port, "netns", subnet.ns)
        _ip(subnet.ns, "link", "set", port, "master", "br0", "up")
        _ip(host.ns, "addr", "add", str(link.interface), "dev", dev)
        host.links.append(link)
        self._bring_up(link)
        return link

    def _bring_up(self, link: Link) -> None:
        """Set the host end up and (re)install the routes of the link."""
        _ip(link.host.ns, "link", "set", link.dev, "up")
        if link.gateway is not None:
            _ip(link.host.ns, "route", "replace", "default", "via", link.gateway, "dev", link.dev)
        if link.multicast:
            _ip(link.host.ns, "route", "replace", MULTICAST, "dev", link.dev)

    def router(
        self,
        label: str,
        public: Subnet,
        private: Subnet,
        *,
        block_inbound: bool = False,
        masquerade: str = "",
    ) -> Router:
        """A NAT router between ``public`` (its ``eth0``) and ``private`` (``eth1``).

        ``block_inbound`` drops every new connection arriving on ``eth0``, to the router
        or through it (forwarded ports excepted). ``masquerade`` adds nft flags to the
        masquerade statement, e.g. ``"fully-random"`` for a NAT that does not keep
        source ports (hole punching must fail through it).
        """
        host = self.host(label)
        pub = self.attach(host, public, multicast=False)
        priv = self.attach(host, private, multicast=False)
        _cmd(netns_argv(host, ["sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"]))
        drop = f'iifname "{pub.dev}" ct state new drop' if block_inbound else ""
        ruleset = f"""
table ip nat {{
    chain pre {{ type nat hook prerouting priority dstnat; policy accept; }}
    chain post {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "{pub.dev}" ip saddr {private.network} masquerade {masquerade}
    }}
}}
table inet filter {{
    chain input {{
        type filter hook input priority filter; policy accept;
        ct state established,related accept
        {drop}
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        ct state established,related accept
        ct status dnat accept
        {drop}
    }}
}}
"""
        _cmd(netns_argv(host, ["nft", "-f", "-"]), stdin=ruleset)
        router = self.routers[label] = Router(host, pub, priv, block_inbound)
        return router

    def behind(self, label: str, router: Router, address: str | None = None) -> Host:
        """A new host on ``router``'s private subnet, default route via the router."""
        host = self.hosts[label] = Host(label, self._new_ns(label))
        self.attach(host, router.private.subnet, address, gateway=router.private_ip, multicast=True)
        return host

    def forward_port(
        self,
        router: Router,
        port: int,
        to: Host,
        to_port: int | None = None,
        proto: Literal["tcp", "udp"] = "tcp",
    ) -> None:
        """Forward ``router.public_ip:port`` to ``to``'s private address (a port mapping
        on a home router, e.g. for an executor that announces the router's address)."""
        target = f"{to.ip_on(router.private.subnet)}:{to_port or port}"
        rule = f'iifname "{router.public.dev}" {proto} dport {port} dnat to {target}'
        _cmd(netns_argv(router.host, ["nft", f"add rule ip nat pre {rule}"]))

    def route(self, host: Host, network: str, via: str) -> None:
        """Add a route on ``host`` to ``network`` via ``via``."""
        _ip(host.ns, "route", "replace", network, "via", via)

    # --- faults ---------------------------------------------------------------------

    def cut(self, link: Link, side: Literal["bridge", "host"] = "bridge") -> None:
        """Cut the cable, silently: no FIN or RST reaches anyone.

        ``"bridge"`` sets the bridge port down: the host's interface stays configured
        (NO-CARRIER, its routes kept, marked ``linkdown``). ``"host"`` sets the host's
        interface down: the kernel also drops the routes through it (restored by
        :meth:`restore`).
        """
        if side == "bridge":
            _ip(link.subnet.ns, "link", "set", link.port, "down")
        else:
            _ip(link.host.ns, "link", "set", link.dev, "down")

    def restore(self, link: Link) -> None:
        """Plug the cable back in (both ends up, the link's routes reinstalled)."""
        _ip(link.subnet.ns, "link", "set", link.port, "up")
        self._bring_up(link)

    # --- running --------------------------------------------------------------------

    def run(
        self, host: Host, argv: Sequence[str], timeout: float = 10.0
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` to completion inside ``host`` (killed at ``timeout``)."""
        return subprocess.run(
            netns_argv(host, argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )

    def popen(self, host: Host, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside ``host`` with stdout piped; killed by PID at close.
        (For lloom nodes use ``procs.start(name, netns_argv(host, argv))``.)"""
        proc = subprocess.Popen(
            netns_argv(host, argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self._popens.append(proc)
        return proc

    # --- teardown -------------------------------------------------------------------

    def close(self) -> None:
        """Kill the processes :meth:`popen` started, delete every namespace made."""
        for proc in reversed(self._popens):
            if proc.poll() is None:
                proc.kill()
            with suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
        self._popens.clear()
        failed = []
        for ns in reversed(self._namespaces):
            done = subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
            if done.returncode != 0:
                failed.append(f"{ns}: {done.stderr.decode(errors='replace').strip()}")
        self._namespaces.clear()
        if failed:
            raise NetnsError("could not delete namespaces: " + "; ".join(failed))


@contextmanager
def topology() -> Iterator[Topology]:
    """A :class:`Topology`, torn down on exit even if building or the body failed."""
    cleanup_stale()
    net = Topology()
    try:
        yield net
    finally:
        net.close()


__all__ = [
    "Host",
    "Link",
    "NetnsError",
    "Router",
    "Subnet",
    "Topology",
    "available",
    "cleanup_stale",
    "netns_argv",
    "topology",
]
