"""The devnet's data dir and the files in it (pure code, no processes).

::

    <data dir>/
        devnet.lock          held while a devnet runs (a second one refuses to start)
        devnet.json          what the devnet knows: chain, contract, and while running,
                             its endpoints and the PIDs of its children
        keys/<role>.key      deployer, validator, executor, gateway and cli keys (mode 0600;
                             the gateway and the command-line client sign receipts, each
                             with its own key and its own ledger)
        anvil/state.json     the chain, dumped by anvil on exit and every few seconds
        executor.toml        the executor's config, written on every start
        <role>/              each child's own data dir (LLOOM_DATA_DIR)
        logs/<role>.log      each child's stdout and stderr
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from lloom.errors import DevnetError

#: Version of the devnet.json layout.
STATE_VERSION = 1

#: Roles that have a key in ``keys/``.
KEY_ROLES = ("deployer", "validator", "executor", "gateway", "cli")


@dataclass(frozen=True, slots=True)
class Layout:
    """Paths under one devnet data dir."""

    root: Path

    @property
    def lock(self) -> Path:
        """The lock file held while a devnet runs."""
        return self.root / "devnet.lock"

    @property
    def state(self) -> Path:
        """devnet.json."""
        return self.root / "devnet.json"

    @property
    def chain_state(self) -> Path:
        """anvil's state dump."""
        return self.root / "anvil" / "state.json"

    @property
    def executor_config(self) -> Path:
        """The executor's generated config."""
        return self.root / "executor.toml"

    def key(self, role: str) -> Path:
        """The key file of ``role``."""
        return self.root / "keys" / f"{role}.key"

    def data(self, role: str) -> Path:
        """The data dir of child ``role``."""
        return self.root / role

    def log(self, role: str) -> Path:
        """The log file of child ``role``."""
        return self.root / "logs" / f"{role}.log"


@dataclass(slots=True)
class Child:
    """A running child as recorded in devnet.json (to clean up after a killed devnet)."""

    pid: int
    argv: list[str]


@dataclass(slots=True)
class Running:
    """What a running devnet serves; present in devnet.json only while it runs."""

    pid: int
    rpc_url: str
    validator: str
    executor_peer_id: str
    executor_address: str
    backend_url: str
    gateway_url: str
    model: str
    cli_key_file: str
    cli_data_dir: str
    children: dict[str, Child] = field(default_factory=dict)


@dataclass(slots=True)
class DevnetState:
    """The contents of devnet.json."""

    chain_id: int | None = None
    contract: str | None = None
    deployer: str | None = None
    running: Running | None = None

    def to_json(self) -> str:
        """Serialize (stable key order, one trailing newline)."""
        doc: dict[str, Any] = {"version": STATE_VERSION, **asdict(self)}
        return json.dumps(doc, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "devnet.json") -> DevnetState:
        """Parse; a file this code cannot read is an error, never silently replaced."""
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DevnetError(f"{source} is not valid JSON: {exc}") from None
        if not isinstance(doc, dict) or doc.get("version") != STATE_VERSION:
            raise DevnetError(f"{source}: unknown layout (expected version {STATE_VERSION})")
        try:
            running = doc.get("running")
            return cls(
                chain_id=_opt(doc, "chain_id", int),
                contract=_opt(doc, "contract", str),
                deployer=_opt(doc, "deployer", str),
                running=None if running is None else _running(running),
            )
        except (TypeError, KeyError, ValueError) as exc:
            raise DevnetError(f"{source}: malformed ({exc})") from None


def _opt(doc: Mapping[str, Any], key: str, kind: type) -> Any:
    value = doc.get(key)
    if value is not None and not isinstance(value, kind):
        raise TypeError(f"{key} must be {kind.__name__}")
    return value


def _running(doc: Mapping[str, Any]) -> Running:
    children = {
        name: Child(pid=int(c["pid"]), argv=[str(a) for a in c["argv"]])
        for name, c in dict(doc.get("children") or {}).items()
    }
    fields = {k: v for k, v in doc.items() if k != "children"}
    return Running(**fields, children=children)


def read_state(layout: Layout) -> DevnetState:
    """devnet.json, or an empty state on the first run."""
    try:
        text = layout.state.read_text(encoding="utf-8")
    except FileNotFoundError:
        return DevnetState()
    except OSError as exc:
        raise DevnetError(f"cannot read {layout.state}: {exc.strerror}") from None
    return DevnetState.from_json(text, str(layout.state))


def write_state(layout: Layout, state: DevnetState) -> None:
    """Write devnet.json atomically (a crash leaves the old or the new file, never half)."""
    tmp = layout.state.with_suffix(".json.tmp")
    tmp.write_text(state.to_json(), encoding="utf-8")
    os.replace(tmp, layout.state)


def executor_config(
    *,
    listen: str,
    data_dir: Path,
    backend_url: str,
    model: str,
    backend_model: str,
    rpc_url: str,
    contract: str,
    settle_interval: float,
    api_key_env: str | None = None,
) -> str:
    """The executor's config.toml for the devnet (checked by the executor's own parser).

    A backend key is named by its environment variable, never written into the file.
    """
    backend: dict[str, object] = {
        "name": "devnet-model",
        "base_url": backend_url,
        "models": {model: backend_model},
        "timeout_secs": 120,
    }
    if api_key_env is not None:
        backend["api_key_env"] = api_key_env
    doc = {
        "node": {"listen": [listen], "data_dir": str(data_dir)},
        "backends": [backend],
        "chain": {
            "rpc_url": rpc_url,
            "contract_address": contract,
            "batch_interval_secs": settle_interval,
            "confirmations": 1,
            "mode": "verified",
        },
    }
    return "# Written by lloom devnet on every start; edits are overwritten.\n" + tomli_w.dumps(doc)


def summary(running: Running, state: DevnetState, root: Path, took: float) -> str:
    """What the devnet prints once it is up: endpoints, then :func:`snippets`."""
    return "\n".join(
        [
            "",
            f"lloom devnet is up ({took:.1f} s), data dir {root}",
            f"  chain      {running.rpc_url} (anvil, chain id {state.chain_id})",
            f"  contract   {state.contract} (Accounting)",
            f"  validator  {running.validator}",
            f"  executor   {running.executor_peer_id} ({running.executor_address})",
            f"  model      {running.model} served at {running.backend_url}",
            f"  gateway    {running.gateway_url} (OpenAI-compatible)",
            f"  logs       {root / 'logs'}",
            "",
            snippets(running, str(state.contract), running.pid, state.chain_id),
            "",
            "Ctrl-C stops everything.",
        ]
    )


def snippets(running: Running, contract: str, devnet_pid: int, chain_id: int | None = None) -> str:
    """The ready-to-paste commands printed once the devnet is up."""
    base = running.gateway_url
    body = json.dumps({"model": running.model, "messages": [{"role": "user", "content": "Hello!"}]})
    python = (
        "from openai import OpenAI; "
        f'c = OpenAI(base_url="{base}", api_key="unused"); '
        f'r = c.chat.completions.create(model="{running.model}", '
        'messages=[{"role": "user", "content": "Hello!"}]); '
        "print(r.choices[0].message.content)"
    )
    client = f"LLOOM_DATA_DIR={shlex.quote(running.cli_data_dir)} " + shlex.join(
        [
            "lloom-client",
            "--bootstrap-nodes",
            running.validator,
            "--key-file",
            running.cli_key_file,
            *(["--chain-id", str(chain_id), "--contract", contract] if chain_id else []),
            "--model",
            running.model,
            "--prompt",
            "Hello!",
        ]
    )
    usage = shlex.join(["lloom", "usage", "--rpc-url", running.rpc_url, "--contract", contract])
    return "\n".join(
        [
            "Try it:",
            f"  curl -s {base}/chat/completions -H 'Content-Type: application/json' \\",
            f"    -d {shlex.quote(body)}",
            "",
            f"  python -c {shlex.quote(python)}",
            "",
            f"  {client}",
            "",
            f"  kill -USR1 {devnet_pid}   # settle usage on chain now",
            f"  {usage}",
        ]
    )
