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
from urllib.parse import urlparse

from lloom.dhtkeys import validate_model_id
from lloom.errors import ConfigError, UsageError
from lloom.executor.backend import BackendSpec
from lloom.executor.handler import Limits
from lloom.node.settings import NodeSettings, parse_node
from lloom.paths import exposed_to_others
from lloom.tomlreader import TableReader, parse_toml

_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")


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
    node: NodeSettings = field(default_factory=lambda: NodeSettings.defaults("executor"))
    chain: ChainSection | None = None

    def served_models(self) -> list[str]:
        """Every network model id, sorted (the first backend listing a model serves it)."""
        return sorted({m for b in self.backends for m in b.models})

    def backend_for(self, model: str) -> BackendSpec | None:
        """The backend that serves ``model``."""
        return next((b for b in self.backends if model in b.models), None)


def _models(r: TableReader) -> dict[str, str]:
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
    r = TableReader(source, f"backends[{index}]", table)
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
    r = TableReader(source, "limits", table)
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


def _chain(source: str, table: object) -> ChainSection:
    r = TableReader(source, "chain", table)
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
    r = TableReader(source, "", parse_toml(text, source))
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
        node=parse_node(source, r.get("node", dict, {}), "executor"),
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
