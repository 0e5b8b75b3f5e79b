"""The executor's ``config.toml``: backends, limits, node and chain settings.

Parsed strictly into frozen dataclasses: a missing key, a wrong type, an unknown field at
any level or a bad value raises :class:`ConfigError` whose one-line message names the file
and the field path (``config.toml: backends[1].base_url: expected a string``). API keys
never appear in messages or reprs. Every key is documented in ``config.toml.example``.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lloom.dhtkeys import validate_model_id
from lloom.errors import ConfigError, UsageError
from lloom.executor.backend import BackendSpec
from lloom.executor.handler import Limits
from lloom.paths import default_data_dir, exposed_to_others

_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")


@dataclass(frozen=True)
class NodeSection:
    """``[node]``: how the executor joins the network."""

    listen: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/4002",)
    announce: tuple[str, ...] = ()
    data_dir: Path = field(default_factory=lambda: default_data_dir() / "executor")
    #: ``host:port`` of a local HTTP endpoint serving Prometheus ``/metrics`` (off if None).
    metrics_listen: str | None = None


@dataclass(frozen=True)
class ChainSection:
    """``[chain]``: on-chain settlement of usage."""

    rpc_url: str
    contract_address: str
    batch_interval_secs: float = 300.0
    confirmations: int = 1
    mode: str = "verified"
    #: Refuse a client with more unsigned (refused or missing) receipts than this since
    #: its last signed one.
    max_unsigned_requests: int = 8


@dataclass(frozen=True)
class ExecutorConfig:
    """The whole executor configuration."""

    backends: tuple[BackendSpec, ...]
    limits: Limits = field(default_factory=Limits)
    node: NodeSection = field(default_factory=NodeSection)
    chain: ChainSection | None = None

    def served_models(self) -> list[str]:
        """Every network model id, sorted (the first backend listing a model serves it)."""
        return sorted({m for b in self.backends for m in b.models})

    def backend_for(self, model: str) -> BackendSpec | None:
        """The backend that serves ``model``."""
        return next((b for b in self.backends if model in b.models), None)


class _Reader:
    """Typed access to one TOML table with field paths for errors."""

    def __init__(self, source: str, path: str, table: object) -> None:
        self.source = source
        self.path = path
        if not isinstance(table, dict):
            raise self.error("expected a table")
        self.table: dict[str, Any] = table
        self.used: set[str] = set()

    def error(self, message: str, key: str | None = None) -> ConfigError:
        where = self.path if key is None else (f"{self.path}.{key}" if self.path else key)
        return ConfigError(f"{self.source}: {where or '(top level)'}: {message}")

    def get(
        self, key: str, kind: type | tuple[type, ...], default: Any = ..., what: str = ""
    ) -> Any:
        self.used.add(key)
        if key not in self.table:
            if default is ...:
                raise self.error("is required", key)
            return default
        value = self.table[key]
        if isinstance(value, bool) and kind in (int, float, (int, float)):
            raise self.error(f"expected {what or _kind_name(kind)}", key)
        if not isinstance(value, kind):
            raise self.error(f"expected {what or _kind_name(kind)}", key)
        return value

    def positive(self, key: str, default: float, integer: bool = False) -> Any:
        kind: type | tuple[type, ...] = int if integer else (int, float)
        value = self.get(key, kind, default)
        if value <= 0:
            raise self.error("must be positive", key)
        return value

    def child(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def finish(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            raise self.error(f"unknown field '{unknown[0]}'")


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", list: "a list", dict: "a table"}
    if isinstance(kind, tuple):
        return "a number" if set(kind) == {int, float} else " or ".join(names[k] for k in kind)
    return names.get(kind, kind.__name__)


def _strings(r: _Reader, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
    values = r.get(key, list, list(default))
    if not all(isinstance(v, str) for v in values):
        raise r.error("expected a list of strings", key)
    return tuple(values)


def _models(r: _Reader) -> dict[str, str]:
    raw = r.get("models", (list, dict), what="a list of model ids or a table id -> backend id")
    pairs = [(m, m) for m in raw] if isinstance(raw, list) else list(raw.items())
    if not pairs:
        raise r.error("must name at least one model", "models")
    out: dict[str, str] = {}
    for network, backend in pairs:
        if not isinstance(network, str) or not isinstance(backend, str) or not backend:
            raise r.error("model ids must be non-empty strings", "models")
        try:
            validate_model_id(network)
        except UsageError as exc:
            raise r.error(str(exc), "models") from None
        out[network] = backend
    return out


def _backend(source: str, index: int, table: object, env: Mapping[str, str]) -> BackendSpec:
    r = _Reader(source, f"backends[{index}]", table)
    name = r.get("name", str)
    base_url = r.get("base_url", str)
    parsed = urlparse(base_url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise r.error("must be an http:// or https:// URL", "base_url")
    api_key = r.get("api_key", str, None)
    key_env = r.get("api_key_env", str, None)
    if api_key is not None and key_env is not None:
        raise r.error("give api_key or api_key_env, not both")
    if key_env is not None:
        api_key = env.get(key_env)
        if not api_key:
            raise r.error(f"environment variable {key_env} is not set", "api_key_env")
    models = _models(r)
    timeout = r.positive("timeout_secs", 120.0)
    remote_media = r.get("allow_remote_media", bool, False)
    r.finish()
    return BackendSpec(name, base_url, api_key, models, float(timeout), remote_media)


def _limits(source: str, table: object) -> Limits:
    r = _Reader(source, "limits", table)
    limits = Limits(
        max_concurrent_requests=r.positive("max_concurrent_requests", 16, integer=True),
        max_requests_per_peer=r.positive("max_requests_per_peer", 8, integer=True),
        max_streams_per_peer=r.positive("max_streams_per_peer", 32, integer=True),
        max_tokens=r.positive("max_tokens", 4096, integer=True),
        request_timeout_secs=float(r.positive("request_timeout_secs", 300.0)),
        max_request_bytes=r.positive("max_request_bytes", 1_048_576, integer=True),
        keepalive_secs=float(r.positive("keepalive_secs", 60.0)),
        checkpoint_secs=float(r.positive("checkpoint_secs", 1.0)),
    )
    r.finish()
    return limits


def _node(source: str, table: object) -> NodeSection:
    r = _Reader(source, "node", table)
    default = NodeSection()
    data_dir = r.get("data_dir", str, None)
    node = NodeSection(
        listen=_strings(r, "listen", default.listen),
        announce=_strings(r, "announce", ()),
        data_dir=Path(data_dir).expanduser() if data_dir else default.data_dir,
        metrics_listen=r.get("metrics_listen", str, None),
    )
    if node.metrics_listen is not None and not re.fullmatch(r".+:\d{1,5}", node.metrics_listen):
        raise r.error("must be HOST:PORT", "metrics_listen")
    r.finish()
    return node


def _chain(source: str, table: object) -> ChainSection:
    r = _Reader(source, "chain", table)
    rpc_url = r.get("rpc_url", str)
    if urlparse(rpc_url).scheme not in ("http", "https", "ws", "wss"):
        raise r.error("must be an http(s):// or ws(s):// URL", "rpc_url")
    address = r.get("contract_address", str)
    if not _ADDRESS.fullmatch(address):
        raise r.error("must be a 0x-prefixed 20-byte hex address", "contract_address")
    confirmations = r.get("confirmations", int, 1)
    if confirmations < 0:
        raise r.error("must be zero or more", "confirmations")
    mode = r.get("mode", str, "verified")
    if mode not in ("verified", "unverified"):
        raise r.error("must be 'verified' or 'unverified'", "mode")
    max_unsigned = r.get("max_unsigned_requests", int, 8)
    if max_unsigned < 0:
        raise r.error("must be zero or more", "max_unsigned_requests")
    chain = ChainSection(
        rpc_url,
        address,
        float(r.positive("batch_interval_secs", 300.0)),
        confirmations,
        mode,
        max_unsigned,
    )
    r.finish()
    return chain


def parse_config(
    text: str, source: str = "config.toml", env: Mapping[str, str] | None = None
) -> ExecutorConfig:
    """Parse the text of a config file."""
    environ = os.environ if env is None else env
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from None
    r = _Reader(source, "", doc)
    raw_backends = r.get("backends", list, what="an array of [[backends]] tables")
    if not raw_backends:
        raise r.error("at least one [[backends]] table is required", "backends")
    backends = tuple(_backend(source, i, t, environ) for i, t in enumerate(raw_backends))
    names = [b.name for b in backends]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ConfigError(f"{source}: backends[{i}].name: duplicate backend name {name!r}")
    config = ExecutorConfig(
        backends=backends,
        limits=_limits(source, r.get("limits", dict, {})),
        node=_node(source, r.get("node", dict, {})),
        chain=_chain(source, r.table["chain"]) if r.get("chain", dict, None) is not None else None,
    )
    r.finish()
    return config


def load_config(path: Path, env: Mapping[str, str] | None = None) -> ExecutorConfig:
    """Read and parse ``path``."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    config = parse_config(text, str(path), env)
    inline_key = any("api_key" in table for table in tomllib.loads(text).get("backends", []))
    exposed = exposed_to_others(path) if inline_key else None
    if exposed is not None:
        raise ConfigError(f"config file {exposed} (or use api_key_env)")
    return config
