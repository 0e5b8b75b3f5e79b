"""Start real lloom processes inside namespace hosts (through :class:`Processes`, so
teardown by PID works as for every e2e test)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

from lloom.devnet.tools import native_anvil
from lloom.readyline import ReadyLine
from tests.support.anvil import ANVIL
from tests.support.netns import Host, netns_argv
from tests.support.network import write_config
from tests.support.procs import Proc, Processes, script

#: Every interface, port chosen by the kernel.
WILDCARD = "/ip4/0.0.0.0/tcp/0"


def ip_of(multiaddr: str) -> str:
    """The IPv4 address of ``/ip4/<ip>/tcp/...``."""
    parts = multiaddr.split("/")
    if len(parts) < 3 or parts[1] != "ip4":
        raise ValueError(f"not an /ip4 address: {multiaddr}")
    return parts[2]


def address_on(ready: ReadyLine, ip: str) -> str:
    """The listen address of ``ready`` on ``ip`` (fails if the node does not list one)."""
    for addr in ready.listen:
        if ip_of(addr) == ip:
            return addr
    raise AssertionError(f"{ready.role} lists no address on {ip}: {ready.listen}")


def start_validator(
    procs: Processes, host: Host, name: str = "validator", listen: str = WILDCARD
) -> tuple[Proc, ReadyLine]:
    """``lloom-validator --listen-address LISTEN`` inside ``host``; its ready line."""
    argv = [script("lloom-validator"), "--listen-address", listen]
    proc = procs.start(name, netns_argv(host, argv))
    return proc, proc.wait_ready()


def start_mock(procs: Processes, host: Host, name: str = "mock") -> tuple[Proc, str]:
    """The mock OpenAI backend on the host's own 127.0.0.1; its /v1 URL."""
    argv = [sys.executable, "-m", "tests.support.mock_openai"]
    proc = procs.start(name, netns_argv(host, argv))
    line = proc.wait_for_line(lambda s: s.startswith("ready url="))
    return proc, line.removeprefix("ready url=")


def start_executor(
    procs: Processes,
    host: Host,
    name: str,
    bootstrap: str,
    backend_url: str,
    models: list[str],
    listen: str = WILDCARD,
    node_extra: str = "",
) -> tuple[Proc, ReadyLine]:
    """``lloom-executor --bootstrap-nodes … --config …`` inside ``host``, its config's
    ``[node] listen`` set to ``listen``; its ready line."""
    root = procs.root / name
    config = write_config(
        root / "config.toml", backend_url, models, root / "state", node_extra=node_extra
    )
    text = config.read_text()
    default = 'listen = ["/ip4/127.0.0.1/tcp/0"]'
    assert default in text, "write_config changed its listen line"
    config.write_text(text.replace(default, f'listen = ["{listen}"]'))
    argv = [script("lloom-executor"), "--bootstrap-nodes", bootstrap, "--config", str(config)]
    proc = procs.start(name, netns_argv(host, argv))
    return proc, proc.wait_ready()


def find_providers(
    procs: Processes, host: Host, bootstrap: str, model: str, name: str = "lookup"
) -> dict[str, list[str]]:
    """What a client in ``host`` finds for ``model``: PeerId → advertised addresses."""
    argv = [sys.executable, "-m", "tests.netns.lookup", bootstrap, model]
    done = procs.run(name, netns_argv(host, argv), timeout=60)
    assert done.returncode == 0, done.stderr
    found: dict[str, list[str]] = json.loads(done.stdout)
    return found


def client_json(
    procs: Processes, host: Host, bootstrap: str, model: str, prompt: str, name: str = "client"
) -> dict[str, object]:
    """``lloom-client … --json`` inside ``host``; its JSON answer."""
    argv = [
        script("lloom-client"),
        "--bootstrap-nodes",
        bootstrap,
        "--model",
        model,
        "--prompt",
        prompt,
        "--json",
        "--timeout",
        "60",
    ]
    done = procs.run(name, netns_argv(host, argv), timeout=90)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stderr}"
    answer: dict[str, object] = json.loads(done.stdout)
    return answer


def data_dir(procs: Processes, name: str) -> Path:
    """The data dir :class:`Processes` gives process ``name``."""
    return procs.root / name / "data"


# --- NAT scenarios (test_nat.py): validators with flags, executors that may fail to start,
# clients with chain flags, anvil inside a namespace host. ----------------------------------


def circuit_relay(addr: str) -> str:
    """The relay's PeerId of ``/…/p2p/<relay>/p2p-circuit/p2p/<target>``."""
    base, sep, _ = addr.partition("/p2p-circuit")
    if not sep or "/p2p/" not in base:
        raise ValueError(f"not a circuit address: {addr}")
    return base.rsplit("/p2p/", 1)[1]


def launch_validator(procs: Processes, host: Host, name: str, *flags: str) -> Proc:
    """``lloom-validator --listen-address 0.0.0.0:0 FLAGS…`` inside ``host`` (not awaited)."""
    argv = [script("lloom-validator"), "--listen-address", WILDCARD, *flags]
    return procs.start(name, netns_argv(host, argv))


def launch_executor(
    procs: Processes,
    host: Host,
    name: str,
    bootstrap: str,
    backend_url: str,
    models: list[str],
    *flags: str,
    extra: str = "",
    node_extra: str = "",
) -> tuple[Proc, Path]:
    """``lloom-executor`` inside ``host`` listening on every interface, config sections
    ``extra`` (e.g. ``[chain]``) and ``node_extra`` (lines of ``[node]``), ``flags`` after
    the config (e.g. ``--private-key``, ``-v``). Not awaited: the caller waits for the
    ready line, or for the exit of an executor that must not start. Returns the process
    and its state dir (where ``usage.sqlite3`` lives)."""
    root = procs.root / name
    state = root / "state"
    config = write_config(
        root / "config.toml", backend_url, models, state, extra=extra, node_extra=node_extra
    )
    text = config.read_text()
    default = 'listen = ["/ip4/127.0.0.1/tcp/0"]'
    assert default in text, "write_config changed its listen line"
    config.write_text(text.replace(default, f'listen = ["{WILDCARD}"]'))
    argv = [
        script("lloom-executor"),
        "--bootstrap-nodes",
        bootstrap,
        "--config",
        str(config),
        *flags,
    ]
    return procs.start(name, netns_argv(host, argv)), state


def run_client(
    procs: Processes,
    host: Host,
    bootstrap: str,
    model: str,
    prompt: str,
    *flags: str,
    name: str = "client",
    timeout: float = 60.0,
) -> subprocess.CompletedProcess[str]:
    """``lloom-client --bootstrap-nodes … --model … --prompt … FLAGS…`` inside ``host``,
    run to completion whatever its exit code (``--timeout`` is ``timeout``; the process
    is killed 30 s after that)."""
    argv = [
        script("lloom-client"),
        *flags,
        "--bootstrap-nodes",
        bootstrap,
        "--model",
        model,
        "--prompt",
        prompt,
        "--timeout",
        f"{timeout:g}",
    ]
    return procs.run(name, netns_argv(host, argv), timeout=timeout + 30)


def start_anvil_at(procs: Processes, host: Host, ip: str, name: str = "anvil") -> tuple[Proc, str]:
    """anvil inside ``host``, listening on ``ip`` (an address other namespaces can route
    to, unlike :func:`tests.support.anvil.start_anvil`'s 127.0.0.1); its RPC URL."""
    if not ANVIL.exists():
        raise FileNotFoundError(f"{ANVIL} missing: run make npm (make test does)")
    home = procs.root / name / "home"
    home.mkdir(parents=True, exist_ok=True)
    argv = [str(native_anvil(ANVIL)), "--host", ip, "--port", "0", "--prune-history", "64"]
    proc = procs.start(name, netns_argv(host, argv), env={"HOME": str(home)})
    line = proc.wait_for_line(lambda s: s.startswith("Listening on "))
    return proc, "http://" + line.removeprefix("Listening on ").strip()


def run_lloom(
    procs: Processes, host: Host, name: str, *args: str, timeout: float = 60.0
) -> dict[str, Any]:
    """``lloom ARGS… --json`` inside ``host``; its JSON output (fails on a non-zero exit)."""
    done = procs.run(name, netns_argv(host, [script("lloom"), *args, "--json"]), timeout=timeout)
    assert done.returncode == 0, f"lloom {' '.join(args)}: exit {done.returncode}\n{done.stderr}"
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc


def chain_section(rpc: str, contract: str) -> str:
    """An executor's ``[chain]`` in verified mode (settles on SIGUSR1, not on a timer)."""
    return (
        f'[chain]\nrpc_url = "{rpc}"\ncontract_address = "{contract}"\n'
        'batch_interval_secs = 3600\nconfirmations = 1\nmode = "verified"\n'
    )


def usage_rows(state: Path) -> list[tuple[Any, ...]]:
    """``(client_address, model, prompt_tokens, completion_tokens, receipt, state)`` of
    every row of an executor's usage store."""
    db = sqlite3.connect(state / "usage.sqlite3")
    try:
        return db.execute(
            "SELECT client_address, model, prompt_tokens, completion_tokens, receipt, state "
            "FROM usage ORDER BY created_at"
        ).fetchall()
    finally:
        db.close()
