"""Who may talk to the gateway: Host and Origin checks, JSON-only POSTs, API keys, limits.

An ASGI middleware in front of the gateway's routes. Every response gets an
``x-request-id`` header (the same id reaches the executor and appears in its usage row).
Before a request reaches the network:

- its ``Host`` must name the gateway (no DNS rebinding: a page on ``evil.example`` that
  resolves to 127.0.0.1 is refused), and an ``Origin``, when a browser sends one, must be an
  allowed host or origin (403);
- a POST must declare ``Content-Type: application/json`` (415): a web page can send
  ``text/plain`` to any address without asking first, but not JSON;
- with keys configured, every path but ``/health`` needs ``Authorization: Bearer <key>``
  (401), and the key's limits must allow it (429 with ``Retry-After``). Successful answers
  carry OpenAI's ``x-ratelimit-*`` headers.

:class:`AccessPolicy` is pure and tested without a server.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from lloom.errors import (
    Forbidden,
    PeerInputError,
    RateLimited,
    Unauthorized,
    UnsupportedMediaType,
)
from lloom.gateway.errors import api_error
from lloom.gateway.keys import KeyRing, Limiter, now
from lloom.gateway.metrics import Metrics

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
#: Paths served without a key (liveness only).
OPEN_PATHS = frozenset({"/health"})


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a listen address) is reachable only from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def is_wildcard(host: str) -> bool:
    """Whether ``host`` listens on every interface."""
    return host.strip("[]") in ("", "0.0.0.0", "::")  # noqa: S104 - a comparison, not a bind


def _hostname(authority: str) -> str:
    """The host name of a ``Host`` header value (port and IPv6 brackets removed)."""
    text = authority.strip().lower()
    if text.startswith("["):
        return text[1 : text.find("]")] if "]" in text else text
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


@dataclass(frozen=True, slots=True)
class AccessPolicy:
    """Which ``Host`` and ``Origin`` values are accepted.

    ``hosts`` are host names (no ports); None accepts any Host (a gateway on every
    interface with keys and no ``--allow-host``). ``origins`` are full origins
    (``https://app.example``) a browser may call from, beyond the allowed hosts.
    """

    hosts: frozenset[str] | None
    origins: frozenset[str] = frozenset()

    @classmethod
    def for_listen(
        cls, host: str, allow_hosts: list[str] | None = None, allow_origins: list[str] | None = None
    ) -> AccessPolicy:
        """The policy of a gateway listening on ``host``."""
        extra = {_hostname(h) for h in allow_hosts or []}
        origins = frozenset(o.rstrip("/").lower() for o in allow_origins or [])
        if is_wildcard(host) and not extra:
            return cls(None, origins)
        names = set(LOOPBACK_NAMES) | extra
        if not is_wildcard(host):
            names.add(_hostname(host))
        return cls(frozenset(names), origins)

    def check(self, method: str, headers: dict[str, str]) -> None:
        """Raise :class:`Forbidden` or :class:`UnsupportedMediaType` for a refused request."""
        host = headers.get("host")
        if host is None:
            raise Forbidden("a Host header is required")
        if self.hosts is not None and _hostname(host) not in self.hosts:
            raise Forbidden(f"Host {host[:100]!r} is not this gateway (see --allow-host)")
        origin = headers.get("origin")
        if origin is not None and origin != "null":
            allowed = origin.rstrip("/").lower() in self.origins or (
                self.hosts is not None and (urlsplit(origin).hostname or "") in self.hosts
            )
            if not allowed:
                raise Forbidden(f"Origin {origin[:100]!r} is not allowed (see --allow-origin)")
        elif origin == "null":
            raise Forbidden("Origin 'null' is not allowed")
        if method == "POST":
            kind = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if kind != "application/json":
                raise UnsupportedMediaType(
                    "the request body must be sent as Content-Type: application/json"
                )


def new_request_id() -> str:
    """A gateway request id: ``req_`` and 24 hex digits."""
    return "req_" + secrets.token_hex(12)


class Guard:
    """The ASGI middleware (see the module doc)."""

    def __init__(
        self,
        app: ASGIApp,
        policy: AccessPolicy,
        keys: KeyRing,
        limiter: Limiter,
        metrics: Metrics,
    ) -> None:
        self.app = app
        self.policy = policy
        self.keys = keys
        self.limiter = limiter
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check the request, then pass it on with its request id and key in ``state``."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = new_request_id()
        headers = {
            k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])
        }
        extra = [(b"x-request-id", request_id.encode())]
        key_name: str | None = None
        try:
            self.policy.check(scope["method"], headers)
            if self.keys and scope["path"] not in OPEN_PATHS:
                key = self.keys.authenticate(headers.get("authorization"))
                key_name = key.name
                quota = self.limiter.admit(key, now())
                extra += [(k.encode(), v.encode()) for k, v in quota.headers().items()]
        except PeerInputError as exc:
            await self._refuse(exc, request_id, send)
            return
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["api_key"] = key_name

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, send_with_headers)

    async def _refuse(self, exc: PeerInputError, request_id: str, send: Send) -> None:
        answer = api_error(exc)
        self.metrics.refused.labels(answer.code or answer.type).inc()
        logger.info("request %s refused: %s", request_id, exc)
        headers = [
            (b"content-type", b"application/json"),
            (b"x-request-id", request_id.encode()),
        ]
        if isinstance(exc, Unauthorized):
            headers.append((b"www-authenticate", b"Bearer"))
        if isinstance(exc, RateLimited):
            headers.append((b"retry-after", str(max(1, round(exc.retry_after))).encode()))
        body = json.dumps(answer.body()).encode()
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": answer.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
