"""What lloom nodes put in their mDNS records and accept from others (pure code).

A node's TXT record carries its addresses (py-libp2p's ``dnsaddr`` keys) and free-form
properties (an executor's role and model ids). Everything a LAN peer sends is bounded and
validated here, and nothing here raises on hostile input: :func:`parse_properties` keeps
what is acceptable, :func:`advertisable_addrs` and :func:`valid_peer_id` decide what is
dialable. The zeroconf side is :mod:`lloom.node.mdns`.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import types
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from libp2p.discovery.mdns.mdns import SERVICE_TYPE
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from multiaddr import Multiaddr

from lloom.node.host import expand_addrs

logger = logging.getLogger(__name__)

#: Properties a node may advertise and will accept from a peer.
MAX_PROPERTIES = 16
#: Bytes of all properties together (``key=value`` each), so the record fits one packet.
MAX_PROPERTIES_BYTES = 1024
#: One TXT entry (``key=value``) on the wire, RFC 6763 6.1.
MAX_ENTRY_BYTES = 255
#: Addresses kept per discovered service.
MAX_ADDRS = 16
#: Services (LAN peers) kept at once; further ones are ignored until some leave.
MAX_SERVICES = 256

_KEY = re.compile(r"[a-z0-9][a-z0-9_.-]{0,31}")
_SERVICE_NAME = re.compile(r"[a-z0-9](?:-?[a-z0-9])*")
_MAX_SERVICE_NAME = 11  # "p2p-" + name <= 15 bytes (RFC 6763 7.2)
_EMPTY: Mapping[str, str] = types.MappingProxyType({})


def service_type(service_name: str | None) -> str:
    """The mDNS service type for ``service_name``: ``_p2p-<name>._udp.local.``, or the
    standard libp2p ``_p2p._udp.local.`` for None."""
    if service_name is None:
        return SERVICE_TYPE
    if len(service_name) > _MAX_SERVICE_NAME or not _SERVICE_NAME.fullmatch(service_name):
        raise ValueError(
            f"invalid mDNS service name {service_name!r}: 1-{_MAX_SERVICE_NAME} characters "
            "from a-z, 0-9 and single inner hyphens"
        )
    return f"_p2p-{service_name}._udp.local."


def _reserved(key: str) -> bool:
    return key == "id" or key.startswith("dnsaddr")


def check_properties(properties: Mapping[str, str]) -> dict[str, str]:
    """Validate properties this node advertises; return them as a new dict.

    Keys: 1-32 characters of ``a-z 0-9 _ . -`` (not ``id`` or ``dnsaddr…``, which carry
    the PeerId and addresses); values: printable text. Raises :class:`ValueError`.
    """
    if len(properties) > MAX_PROPERTIES:
        raise ValueError(f"at most {MAX_PROPERTIES} mDNS properties, not {len(properties)}")
    total = 0
    out: dict[str, str] = {}
    for key, value in properties.items():
        if not isinstance(key, str) or not _KEY.fullmatch(key) or _reserved(key):
            raise ValueError(f"invalid mDNS property key {key!r}")
        if not isinstance(value, str) or not value.isprintable():
            raise ValueError(f"mDNS property {key!r}: the value must be printable text")
        size = len(key) + 1 + len(value.encode())
        if size > MAX_ENTRY_BYTES:
            raise ValueError(
                f"mDNS property {key!r} is {size} bytes as key=value, at most "
                f"{MAX_ENTRY_BYTES} (split long lists with pack_list)"
            )
        total += size
        out[key] = value
    if total > MAX_PROPERTIES_BYTES:
        raise ValueError(f"mDNS properties take {total} bytes, at most {MAX_PROPERTIES_BYTES}")
    return out


def parse_properties(raw: Mapping[bytes, bytes | None]) -> dict[str, str]:
    """The acceptable properties of a received TXT record; never raises.

    Entries that :func:`check_properties` would refuse are skipped, as are reserved keys,
    valueless keys and entries beyond the count or byte budget (first come, first kept).
    """
    out: dict[str, str] = {}
    total = 0
    try:
        for raw_key, raw_value in raw.items():
            if len(out) >= MAX_PROPERTIES:
                break
            if not isinstance(raw_key, bytes) or not isinstance(raw_value, bytes):
                continue
            try:
                key = raw_key.decode("ascii")
                value = raw_value.decode("utf-8")
            except UnicodeDecodeError:
                continue
            if not _KEY.fullmatch(key) or _reserved(key) or not value.isprintable():
                continue
            size = len(raw_key) + 1 + len(raw_value)
            if size > MAX_ENTRY_BYTES or total + size > MAX_PROPERTIES_BYTES:
                continue
            total += size
            out[key] = value
    except Exception:  # a hostile mapping: keep what was read
        logger.debug("unreadable mDNS properties", exc_info=True)
    return out


def pack_list(key: str, values: Iterable[str]) -> dict[str, str]:
    """Comma-separated ``values`` as properties ``key``, ``key.1``, ``key.2``, … each
    within :data:`MAX_ENTRY_BYTES`; read back with :meth:`LanPeer.list_property`.
    Values must not contain commas. The result still has to fit :func:`check_properties`.
    """
    chunks: list[list[str]] = [[]]
    room = MAX_ENTRY_BYTES - len(key) - 3  # "key.N=" with N < 10
    for value in values:
        if "," in value or not value:
            raise ValueError(f"list value {value!r} is empty or contains a comma")
        size = len(value.encode())
        if size > room:
            raise ValueError(f"list value {value!r} is too long for one mDNS property")
        used = sum(len(v.encode()) + 1 for v in chunks[-1])
        if chunks[-1] and used + size > room:
            chunks.append([])
        chunks[-1].append(value)
    out: dict[str, str] = {}
    for i, chunk in enumerate(c for c in chunks if c):
        out[key if i == 0 else f"{key}.{i}"] = ",".join(chunk)
    return out


@dataclass(frozen=True)
class LanPeer:
    """A peer seen on the LAN: its PeerId, advertised addresses and properties."""

    peer_id: ID
    addrs: tuple[Multiaddr, ...]
    properties: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    #: ``time.monotonic()`` when its record was last added or changed.
    seen: float = 0.0

    @property
    def info(self) -> PeerInfo:
        """A :class:`PeerInfo` to dial."""
        return PeerInfo(self.peer_id, list(self.addrs))

    def list_property(self, key: str) -> list[str]:
        """A list written with :func:`pack_list` (or one comma-separated property)."""
        parts = [self.properties.get(key, "")]
        parts += [self.properties.get(f"{key}.{i}", "") for i in range(1, MAX_PROPERTIES)]
        return [v for part in parts for v in part.split(",") if v]


def dialable(addr: Multiaddr) -> bool:
    """``/ip4|ip6/<concrete ip>/tcp/<port>``: what lloom can dial."""
    try:
        names = [p.name for p in addr.protocols()]
        if names not in (["ip4", "tcp"], ["ip6", "tcp"]):
            return False
        ip = ipaddress.ip_address(addr.value_for_protocol(names[0]))
        port = int(addr.value_for_protocol("tcp"))
    except Exception:  # unparsable: not dialable
        return False
    return 0 < port < 65536 and not ip.is_unspecified and not ip.is_multicast


def valid_peer_id(peer_id: ID) -> bool:
    """A real PeerId: sha2-256 of a key (RSA ``Qm…``) or an embedded public key."""
    raw = peer_id.to_bytes()
    if len(raw) == 34 and raw[:2] == b"\x12\x20":
        return True
    return peer_id.extract_public_key() is not None


def is_loopback(addr: Multiaddr) -> bool:
    """Whether a :func:`dialable` address is a loopback one."""
    return ipaddress.ip_address(addr.value_for_protocol(addr.protocols()[0].name)).is_loopback


def advertisable_addrs(addrs: Sequence[Multiaddr]) -> list[Multiaddr]:
    """The addresses to advertise for listen addresses ``addrs``: wildcards expanded to
    interface addresses, only dialable TCP, loopback only if nothing else is left."""
    usable = [a for a in expand_addrs(addrs) if dialable(a)]
    return [a for a in usable if not is_loopback(a)] or usable
