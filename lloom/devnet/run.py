"""``lloom devnet``: a whole lloom network on this machine, under one data dir.

Starts, in order, and stops in reverse: anvil (chain state kept in the data dir), the
Accounting contract (deployed once, then reused), the model server (the embedded SmolLM2,
or ``--backend-url``), a validator, an executor and a gateway. Prints progress while it
starts, then the endpoints and commands to try; SIGUSR1 makes the executor settle now;
Ctrl-C (SIGINT) or SIGTERM stops every child. A second run reuses keys, chain and contract.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio

from lloom.devnet.chain import ensure_contract, fund
from lloom.devnet.datadir import ensure_keys, locked
from lloom.devnet.layout import Child as RecordedChild
from lloom.devnet.layout import (
    DevnetState,
    Layout,
    Running,
    executor_config,
    read_state,
    summary,
    write_state,
)
from lloom.devnet.model_venv import build as build_model_venv
from lloom.devnet.probes import wait_for_models
from lloom.devnet.supervisor import Child, Supervisor, cmdline, end_leftover
from lloom.devnet.tools import (
    EmbeddedModel,
    default_model_threads,
    default_model_venv,
    explicit_model_python,
    find_anvil,
    find_embedded_model,
    free_port,
    lloom_script,
)
from lloom.errors import DevnetError, LloomError
from lloom.identity import Identity
from lloom.paths import private_file
from lloom.readyline import ReadyLine

#: Steps shown as [n/STEPS].
STEPS = 6
#: The line printed once everything is up (scripts wait for it).
READY_PREFIX = "devnet ready"


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


def _end_leftovers(state: DevnetState, say: Callable[[str], None]) -> None:
    """Children a killed devnet left behind (checked by PID and full command line)."""
    if state.running is None:
        return
    for name, child in state.running.children.items():
        if end_leftover(child.pid, child.argv):
            say(f"stopped {name} (pid {child.pid}) left running by an earlier devnet")


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
            lloom_script(script)
        self.state = read_state(self.layout)
        _end_leftovers(self.state, self.say)
        self.state.running = None
        write_state(self.layout, self.state)
        self.keys = ensure_keys(self.layout)

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
        gateway_url = await self._gateway(validator, contract)
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
        self.say(summary(running, self.state, self.layout.root, took))
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
            await trio.to_thread.run_sync(fund, rpc_url, addresses)
        return rpc_url

    async def _contract(self, rpc_url: str) -> str:
        async with self._step(2, "Deploying the Accounting contract"):
            address, chain_id, reused = await trio.to_thread.run_sync(
                ensure_contract, rpc_url, self.keys["deployer"], self.state.contract
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
                await wait_for_models(o.backend_url, timeout=10.0, api_key=key)
            return o.backend_url.rstrip("/")
        port = o.model_port or free_port(o.host)
        url = f"http://{o.host}:{port}/v1"
        async with self._step(3, "Loading the model (SmolLM2-135M-Instruct, llama.cpp)"):
            argv = self.model.argv(o.host, port, o.model, o.model_threads)
            child = await self._start("model", argv)
            await wait_for_models(url, timeout=o.startup_timeout, child=child)
        return url

    async def _validator(self) -> str:
        async with self._step(4, "Starting the validator"):
            argv = [
                lloom_script("lloom-validator"),
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
            private_file(self.layout.executor_config).write_text(text, encoding="utf-8")
            argv = [
                lloom_script("lloom-executor"),
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

    async def _gateway(self, validator: str, contract: str) -> str:
        o = self.options
        async with self._step(6, "Starting the gateway"):
            argv = [
                lloom_script("lloom-client"),
                "gateway",
                "--key-file",
                str(self.layout.key("gateway")),
                "--chain-id",
                str(self.state.chain_id),
                "--contract",
                contract,
                "--bootstrap-nodes",
                validator,
                "--listen",
                f"{o.host}:{o.gateway_port}",
            ]
            child = await self._start("gateway", argv)
            ready = await self._ready(child, "its ready line")
            url = f"http://{ready.get('http')}/v1"
            await wait_for_models(url, timeout=o.startup_timeout, child=child, model=o.model)
        return url


def _relay_settlement(line: str) -> str | None:
    """Executor stdout lines a person watching the devnet wants to see."""
    return f"executor: {line}" if line.startswith("settlement ") else None


def run_devnet(options: Options, say: Callable[[str], None] = _say) -> None:
    """Run the devnet until it is stopped; raises :class:`DevnetError` on failure."""
    devnet = Devnet(options, say)
    with locked(devnet.layout):
        devnet.prepare()
        trio.run(devnet.run)
