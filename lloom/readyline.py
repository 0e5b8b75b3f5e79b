"""The ready line a node prints on stdout once it listens, for scripts and tests to wait on.

Format (one line, space-separated ``key=value`` fields, values never contain spaces)::

    ready role=validator peer_id=16Uiu2… address=0xf39F… listen=/ip4/1.2.3.4/tcp/4001/p2p/16Uiu2…

``listen`` holds every listen multiaddr, each ending in ``/p2p/<PeerId>``, comma-separated.
A shell script can take the first one with
``sed -n 's/^ready .*listen=\\([^ ,]*\\).*/\\1/p'``.
"""

from __future__ import annotations

from dataclasses import dataclass

from lloom.errors import ProtocolError

PREFIX = "ready"


@dataclass(frozen=True, slots=True)
class ReadyLine:
    """What a node announces when it is ready."""

    role: str
    peer_id: str
    address: str
    listen: tuple[str, ...]
    extra: tuple[tuple[str, str], ...] = ()

    def format(self) -> str:
        """The line, without a trailing newline."""
        fields = [
            ("role", self.role),
            ("peer_id", self.peer_id),
            ("address", self.address),
            ("listen", ",".join(self.listen)),
            *self.extra,
        ]
        for key, value in fields:
            if not value or any(c.isspace() for c in value) or "=" in key:
                raise ValueError(f"ready-line field {key} has an empty or spaced value")
        return PREFIX + " " + " ".join(f"{k}={v}" for k, v in fields)

    @classmethod
    def parse(cls, line: str) -> ReadyLine:
        """Parse a ready line; raises :class:`ProtocolError` if it is not one."""
        parts = line.strip().split(" ")
        if not parts or parts[0] != PREFIX:
            raise ProtocolError("not a ready line")
        fields: dict[str, str] = {}
        for part in parts[1:]:
            key, sep, value = part.partition("=")
            if not sep:
                raise ProtocolError(f"malformed ready-line field {part!r}")
            fields[key] = value
        try:
            role = fields.pop("role")
            peer_id = fields.pop("peer_id")
            address = fields.pop("address")
            listen = tuple(fields.pop("listen").split(","))
        except KeyError as exc:
            raise ProtocolError(f"ready line lacks field {exc.args[0]}") from None
        return cls(role, peer_id, address, listen, tuple(fields.items()))

    def get(self, key: str) -> str | None:
        """An extra field by name."""
        return dict(self.extra).get(key)
