"""``lloom devnet``: a whole lloom network on this machine, under one data dir.

Starts, in order, and stops in reverse: anvil (chain state kept in the data dir), the
Accounting contract (deployed once, then reused), the model server (the embedded SmolLM2,
or ``--backend-url``), a validator, an executor and a gateway. Prints progress while it
starts, then the endpoints and commands to try; SIGUSR1 makes the executor settle now;
Ctrl-C (SIGINT) or SIGTERM stops every child. A second run reuses keys, chain and contract.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import trio
from web3 import Web3
from web3.exceptions import Web3Exception

from lloom.chain.contract import artifact, connect
from lloom.chain.tx import ChainError, deploy
from lloom.devnet.layout import (
    KEY_ROLES,
    DevnetState,
    Layout,
    Running,
    executor_config,
    read_state,
    snippets,
    write_state,
)
from lloom.devnet.layout import Child as RecordedChild
from lloom.devnet.model_venv import build as build_model_venv
from lloom.devnet.supervisor import Child, Supervisor, cmdline, end_leftover
from lloom.devnet.tools import (
    EmbeddedModel,
    default_model_venv,
    explicit_model_python,
    find_anvil,
    find_embedded_model,
    free_port,
)
from lloom.errors import DevnetError, LloomError
from lloom.identity import Identity
from lloom.readyline import ReadyLine

#: What a devnet account is topped up to on every start (anvil's fake ether).
FUNDING_WEI = 1000 * 10**18
#: Steps shown as [n/STEPS].
STEPS = 6
#: The line printed once everything is up (scripts wait for it).
READY_PREFIX = "devnet ready"


def default_model_threads() -> int:
    """All cores but one, so the executor and gateway relaying the model's chunks keep one.

    Measured with SmolLM2 on 2 cores (docs/benchmarks.md, "Real model"): one thread streams
    as fast or faster through the gateway than two, with steadier latency; only the time
    to the first token grows (prompt evaluation uses the second core).
    """
    return max(1, (os.cpu_count() or 1) - 1)


@dataclass(frozen=True, slots=True)
class Options:
    """What ``lloom devnet`` was asked to do (see ``lloom devnet --help``)."""

    data_dir: Path
    host: str = "127.0.0.1"
    rpc_port: int = 8545
    p2p_port: int = 4001
    gateway_port: int = 8080
    model: str = "smollm2"
    model_port: int = 0
    model_threads: int = field(default_factory=default_model_threads)
    model_python: Path | None = None
    model_file: Path | None = None
    backend_url: str | None = None
    backend_model: str | None = None
    backend_api_key_env: str | None = None
    anvil: Path | None = None
    settle_interval: float = 30.0
    startup_timeout: float = 180.0


def _say(text: str) -> None:
    print(text, flush=True)


@contextmanager
def _locked(layout: Layout) -> Iterator[None]:
    """Hold the data dir's lock; a second devnet on the same dir gets a clear error."""
    layout.root.mkdir(parents=True, exist_ok=True)
    handle: IO[str] = layout.lock.open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        raise DevnetError(
            f"another lloom devnet (pid {holder}) is using {layout.root}; stop it first"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    try:
        yield
    finally:
        handle.close()


def _keys(layout: Layout) -> dict[str, Identity]:
    """Every role's identity; created (mode 0600) on the first run, then reused."""
    folder = layout.key("any").parent
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)
    keys = {}
    for role in KEY_ROLES:
        path = layout.key(role)
        if not path.exists():
            Identity.generate().write_key_file(path)
        keys[role] = Identity.from_key_file(path)
    return keys


def _end_leftovers(state: DevnetState, say: Callable[[str], None]) -> None:
    """Children a killed devnet left behind (checked by PID and full command line)."""
    if state.running is None:
        return
    for name, child in state.running.children.items():
        if end_leftover(child.pid, child.argv):
            say(f"stopped {name} (pid {child.pid}) left running by an earlier devnet")


def _script(name: str) -> str:
    """A lloom console script: next to this Python, else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise DevnetError(f"{name} not found next to {sys.executable} or on PATH")
    return found


def _child_env(layout: Layout, role: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLOOM_")}
    env["LLOOM_DATA_DIR"] = str(layout.data(role))
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Devnet:
    """One run of the devnet."""

    def __init__(self, options: Options, say: Callable[[str], None] = _say) -> None:
        self.options = options
        self.layout = Layout(options.data_dir.resolve())
        self.say = say
        self.state = DevnetState()
        self.keys: dict[str, Identity] = {}
        self.model: EmbeddedModel | None = None
        self.anvil = Path()
        self.sup: Supervisor | None = None

    # -- preparation (before any child starts) ----------------------------------------------

    def prepare(self) -> None:
        """Check everything that can be checked before starting anything."""
        options = self.options
        if options.backend_api_key_env is not None:
            if options.backend_url is None:
                raise DevnetError("--backend-api-key-env needs --backend-url")
            if not os.environ.get(options.backend_api_key_env):
                raise DevnetError(
                    f"--backend-api-key-env: ${options.backend_api_key_env} is not set"
                )
        if options.backend_url is None:
            self.model = self._find_or_build_model()
        elif options.model_python is not None or options.model_file is not None:
            raise DevnetError("--backend-url replaces the embedded model: drop --model-python")
        self.anvil = find_anvil(options.anvil)
        for script in ("lloom-validator", "lloom-executor", "lloom-client"):
            _script(script)
        self.state = read_state(self.layout)
        _end_leftovers(self.state, self.say)
        self.state.running = None
        write_state(self.layout, self.state)
        self.keys = _keys(self.layout)

    def _find_or_build_model(self) -> EmbeddedModel:
        """The embedded model; built once into the default venv when nothing has it."""
        options = self.options
        try:
            return find_embedded_model(options.model_python, options.model_file)
        except DevnetError:
            if explicit_model_python(options.model_python) is not None:
                raise  # the Python the user named lacks it: say so, do not guess
        venv = default_model_venv()
        self.say(f"[0/{STEPS}] Building the embedded model into {venv} (once)…")
        python = build_model_venv(venv, self.say)
        return find_embedded_model(python, options.model_file)

    # -- the run ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Start everything, serve until SIGINT/SIGTERM (or a child dies), stop everything."""
        failure: LloomError | None = None
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGUSR1) as sigs:
            async with trio.open_nursery() as nursery:
                self.sup = sup = Supervisor(nursery, self.say)
                stop = trio.Event()
                nursery.start_soon(self._signals, sigs, stop)
                try:
                    with trio.CancelScope() as scope:
                        nursery.start_soon(self._cancel_when, stop, scope)
                        nursery.start_soon(self._cancel_when, sup.died, scope)
                        await self._start_all()
                        await stop.wait()
                except LloomError as exc:
                    failure = exc
                finally:
                    self.say("stopping…")
                    await sup.stop_all()
                    self.state.running = None
                    write_state(self.layout, self.state)
                    nursery.cancel_scope.cancel()
        if failure is None and sup.dead is not None:
            dead = sup.dead
            failure = DevnetError(
                f"{dead.name} exited unexpectedly (code {dead.returncode}); "
                f"its log {dead.log_path} ends with:\n{dead.log_tail()}"
            )
        if failure is not None:
            raise failure
        self.say("devnet stopped")

    async def _cancel_when(self, event: trio.Event, scope: trio.CancelScope) -> None:
        await event.wait()
        scope.cancel()

    async def _signals(self, signals: AsyncIterator[int], stop: trio.Event) -> None:
        async for signum in signals:
            if signum == signal.SIGUSR1:
                assert self.sup is not None
                if self.sup.signal("executor", signal.SIGUSR1):
                    self.say("asked the executor to settle now")
                continue
            self.say(f"received {signal.Signals(signum).name}")
            stop.set()

    async def _start_all(self) -> None:
        started = time.monotonic()
        rpc_url = await self._chain()
        contract = await self._contract(rpc_url)
        backend_url = await self._model()
        validator = await self._validator()
        executor = await self._executor(validator, backend_url, rpc_url, contract)
        gateway_url = await self._gateway(validator)
        assert self.sup is not None
        running = Running(
            pid=os.getpid(),
            rpc_url=rpc_url,
            validator=validator,
            executor_peer_id=executor.peer_id,
            executor_address=executor.address,
            backend_url=backend_url,
            gateway_url=gateway_url,
            model=self.options.model,
            cli_key_file=str(self.layout.key("cli")),
            cli_data_dir=str(self.layout.data("cli")),
            # As the kernel shows them (a script runs as its interpreter), so that a later
            # devnet can recognise them exactly if this one is killed.
            children={
                c.name: RecordedChild(pid=c.pid, argv=cmdline(c.pid) or c.argv)
                for c in self.sup.children
            },
        )
        self.state.running = running
        write_state(self.layout, self.state)
        took = time.monotonic() - started
        self.say("")
        self.say(f"lloom devnet is up ({took:.1f} s), data dir {self.layout.root}")
        self.say(f"  chain      {rpc_url} (anvil, chain id {self.state.chain_id})")
        self.say(f"  contract   {contract} (Accounting)")
        self.say(f"  validator  {validator}")
        self.say(f"  executor   {executor.peer_id} ({executor.address})")
        self.say(f"  model      {self.options.model} served at {backend_url}")
        self.say(f"  gateway    {gateway_url} (OpenAI-compatible)")
        self.say(f"  logs       {self.layout.root / 'logs'}")
        self.say("")
        self.say(snippets(running, contract, os.getpid()))
        self.say("")
        self.say("Ctrl-C stops everything.")
        self.say(f"{READY_PREFIX} state={self.layout.state}")

    @asynccontextmanager
    async def _step(self, n: int, what: str) -> AsyncIterator[None]:
        """Print a step, a heartbeat while it takes long, and how long it took."""
        assert self.sup is not None
        self.say(f"[{n}/{STEPS}] {what}…")
        started = time.monotonic()
        heartbeat = trio.CancelScope()

        async def beat() -> None:
            with heartbeat:
                while True:
                    await trio.sleep(5)
                    self.say(
                        f"      still {what[0].lower()}{what[1:]} "
                        f"({time.monotonic() - started:.0f} s)"
                    )

        self.sup.nursery.start_soon(beat)
        try:
            yield
        finally:
            heartbeat.cancel()
        self.say(f"      done in {time.monotonic() - started:.1f} s")

    async def _start(
        self, name: str, argv: list[str], relay: Callable[[str], str | None] | None = None
    ) -> Child:
        assert self.sup is not None
        return await self.sup.start(
            name, argv, self.layout.log(name), _child_env(self.layout, name), relay
        )

    async def _ready(self, child: Child, what: str) -> ReadyLine:
        assert self.sup is not None
        line = await self.sup.wait_for_line(
            child, lambda s: s.startswith("ready "), self.options.startup_timeout, what
        )
        return ReadyLine.parse(line)

    async def _chain(self) -> str:
        o = self.options
        async with self._step(1, "Starting the chain (anvil)"):
            self.layout.chain_state.parent.mkdir(parents=True, exist_ok=True)
            argv = [
                str(self.anvil),
                "--host",
                o.host,
                "--port",
                str(o.rpc_port),
                "--state",
                str(self.layout.chain_state),
                "--state-interval",
                "5",
            ]
            child = await self._start("anvil", argv)
            assert self.sup is not None
            line = await self.sup.wait_for_line(
                child, lambda s: s.startswith("Listening on "), o.startup_timeout, "listening"
            )
            rpc_url = "http://" + line.removeprefix("Listening on ").strip()
            addresses = [self.keys[r].address for r in ("deployer", "executor")]
            await trio.to_thread.run_sync(_fund, rpc_url, addresses)
        return rpc_url

    async def _contract(self, rpc_url: str) -> str:
        async with self._step(2, "Deploying the Accounting contract"):
            address, chain_id, reused = await trio.to_thread.run_sync(
                _ensure_contract, rpc_url, self.keys["deployer"], self.state.contract
            )
            self.state.chain_id = chain_id
            self.state.contract = address
            self.state.deployer = self.keys["deployer"].address
            write_state(self.layout, self.state)
            self.say(f"      {'reusing' if reused else 'deployed'} Accounting at {address}")
        return address

    async def _model(self) -> str:
        o = self.options
        if self.model is None:
            assert o.backend_url is not None
            key = os.environ.get(o.backend_api_key_env) if o.backend_api_key_env else None
            async with self._step(3, f"Checking the backend at {o.backend_url}"):
                await _check_backend(o.backend_url, None, 10.0, key)
            return o.backend_url.rstrip("/")
        port = o.model_port or free_port(o.host)
        url = f"http://{o.host}:{port}/v1"
        async with self._step(3, "Loading the model (SmolLM2-135M-Instruct, llama.cpp)"):
            argv = self.model.argv(o.host, port, o.model, o.model_threads)
            child = await self._start("model", argv)
            await _check_backend(url, child, o.startup_timeout)
        return url

    async def _validator(self) -> str:
        async with self._step(4, "Starting the validator"):
            argv = [
                _script("lloom-validator"),
                "--key-file",
                str(self.layout.key("validator")),
                "--listen-address",
                f"/ip4/{self.options.host}/tcp/{self.options.p2p_port}",
            ]
            ready = await self._ready(await self._start("validator", argv), "its ready line")
        return ready.listen[0]

    async def _executor(
        self, validator: str, backend_url: str, rpc_url: str, contract: str
    ) -> ReadyLine:
        o = self.options
        async with self._step(5, "Starting the executor"):
            text = executor_config(
                listen=f"/ip4/{o.host}/tcp/0",
                data_dir=self.layout.data("executor"),
                backend_url=backend_url,
                model=o.model,
                backend_model=o.backend_model or o.model,
                rpc_url=rpc_url,
                contract=contract,
                settle_interval=o.settle_interval,
                api_key_env=o.backend_api_key_env,
            )
            self.layout.executor_config.write_text(text, encoding="utf-8")
            argv = [
                _script("lloom-executor"),
                "--key-file",
                str(self.layout.key("executor")),
                "--bootstrap-nodes",
                validator,
                "--config",
                str(self.layout.executor_config),
            ]
            child = await self._start("executor", argv, _relay_settlement)
            ready = await self._ready(child, "its ready line")
        return ready

    async def _gateway(self, validator: str) -> str:
        o = self.options
        async with self._step(6, "Starting the gateway"):
            argv = [
                _script("lloom-client"),
                "gateway",
                "--key-file",
                str(self.layout.key("gateway")),
                "--bootstrap-nodes",
                validator,
                "--listen",
                f"{o.host}:{o.gateway_port}",
            ]
            child = await self._start("gateway", argv)
            ready = await self._ready(child, "its ready line")
            url = f"http://{ready.get('http')}/v1"
            await _wait_for_model(url, o.model, child, o.startup_timeout)
        return url


def _relay_settlement(line: str) -> str | None:
    """Executor stdout lines a person watching the devnet wants to see."""
    return f"executor: {line}" if line.startswith("settlement ") else None


def _fund(rpc_url: str, addresses: list[str]) -> None:
    """Top up devnet accounts with anvil's fake ether."""
    w3 = connect(rpc_url)
    try:
        for address in addresses:
            checksum = Web3.to_checksum_address(address)
            if w3.eth.get_balance(checksum) < FUNDING_WEI // 2:
                w3.provider.make_request("anvil_setBalance", [checksum, hex(FUNDING_WEI)])  # type: ignore[arg-type]
    except (Web3Exception, OSError, ValueError) as exc:
        raise DevnetError(f"cannot fund devnet accounts on {rpc_url}: {exc}") from None


def _ensure_contract(rpc_url: str, deployer: Identity, known: str | None) -> tuple[str, int, bool]:
    """The Accounting address: the known one if its code is on chain, else a new deployment."""
    w3 = connect(rpc_url)
    try:
        chain_id = int(w3.eth.chain_id)
        # Code at the recorded address means the chain state was kept; a chain started
        # afresh (state file deleted) has none there, and gets a new deployment.
        if (
            known is not None
            and Web3.is_address(known)
            and w3.eth.get_code(Web3.to_checksum_address(known))
        ):
            return known, chain_id, True
        address = deploy(w3, deployer, artifact()["abi"], artifact()["bytecode"])
    except (Web3Exception, OSError, ValueError, ChainError) as exc:
        raise DevnetError(f"cannot deploy Accounting on {rpc_url}: {exc}") from None
    return address, chain_id, False


async def _check_backend(
    base_url: str, child: Child | None, timeout: float, api_key: str | None = None
) -> None:
    """Wait until ``GET {base_url}/models`` answers 200 (the backend has loaded its model)."""
    last = "no answer"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(timeout=5.0, headers=headers) as http:
        with trio.move_on_after(timeout):
            while True:
                if child is not None and child.returncode is not None:
                    raise DevnetError(
                        f"the model server exited (code {child.returncode}); its log "
                        f"{child.log_path} ends with:\n{child.log_tail()}"
                    )
                try:
                    response = await http.get(base_url.rstrip("/") + "/models")
                    if response.status_code == 200:
                        return
                    last = f"HTTP {response.status_code}"
                except httpx.HTTPError as exc:
                    last = type(exc).__name__
                await trio.sleep(0.2)
    raise DevnetError(f"backend {base_url} not ready within {timeout:.0f} s ({last})")


async def _wait_for_model(gateway_url: str, model: str, child: Child, timeout: float) -> None:
    """Wait until the gateway lists ``model`` (it has found the executor)."""
    async with httpx.AsyncClient(timeout=5.0) as http:
        with trio.move_on_after(timeout):
            while child.returncode is None:
                try:
                    response = await http.get(gateway_url + "/models")
                    data: Any = response.json().get("data", [])
                    if any(isinstance(m, dict) and m.get("id") == model for m in data):
                        return
                except (httpx.HTTPError, ValueError, AttributeError):
                    pass
                await trio.sleep(0.2)
    raise DevnetError(f"the gateway did not find an executor for {model} within {timeout:.0f} s")


def run_devnet(options: Options, say: Callable[[str], None] = _say) -> None:
    """Run the devnet until it is stopped; raises :class:`DevnetError` on failure."""
    devnet = Devnet(options, say)
    with _locked(devnet.layout):
        devnet.prepare()
        trio.run(devnet.run)
