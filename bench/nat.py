"""NAT traversal benchmark: what a validator's circuit relay costs, across network namespaces.

``python -m bench nat`` builds, with :mod:`tests.support.netns` (root, ``ip``, ``nft``), a
public subnet holding a validator, a client host and executor **D** (direct), and behind an
inbound-blocking NAT router on it a home subnet holding executors **R1…R4**, which find out
they are private and serve through the validator's relay (their ready line says
``path=relayed``). Every executor has its own mock backend (:mod:`tests.support.mock_openai`)
on its namespace's 127.0.0.1. Every node is a real lloom process; the client side is a
worker process (``python -m bench.nat worker MODE JSON``) started in the client's namespace
that uses the client library (:func:`lloom.client.session.send_request`) with the
``PeerInfo`` a DHT lookup returned, so only the path differs. Clients run without hole
punching so that every relayed request stays relayed (checked per request).

1. **Relayed against direct.** The same streamed request (a 48-word answer, no backend
   delay) to D and to R1, interleaved, on a warm connection with reused request streams:
   time to first token and total time; and on a new connection (host started, dialled,
   first token).
2. **Start to ready.** Executors started one after another in D's and R1's namespaces:
   process start to reachability verdict, to relay reservation held (stderr lines, stamped
   as they arrive) and to the ready line.
3. **What one validator relays.** 4, 8, 32 and 64 clients (one client host and one stream
   each) at once, each asking one of R1…R4 (default ``max_concurrent_requests`` 16 each)
   for streamed answers from a backend sending one word every 20 ms; chunks delivered in
   a fixed window against those offered, errors, and CPU seconds of the validator (and of
   the other processes) per 1,000 relayed chunks from ``/proc/<pid>/stat``.

Only addresses of the namespaces built here are used; every process started is stopped by
PID, and the namespaces are deleted on exit, also on failure. ``LLOOM_BENCH_QUICK=1``
shrinks every count, to check that the benchmark runs; ``BENCH_NAT_LEVELS=8,64`` sets the
numbers of clients of part 3.
"""

from __future__ import annotations

import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from libp2p.peer.peerinfo import PeerInfo
from multiaddr import Multiaddr

from bench.report import STATS_HEADER, Stats, write_section
from lloom.client.discovery import find_executors
from lloom.client.session import StreamPool, send_request
from lloom.errors import LloomError, RemoteError
from lloom.identity import Identity
from lloom.logs import configure_logging
from lloom.node.node import Node, NodeConfig, open_node
from lloom.protocol import llm
from lloom.readyline import ReadyLine
from tests.support.netns import Host, Topology, available, netns_argv, topology

SECTION = "NAT traversal"
#: ``LLOOM_BENCH_QUICK=1`` shrinks every count, to check that the benchmark runs.
QUICK = os.environ.get("LLOOM_BENCH_QUICK") == "1"
ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MARK = "@@"
#: The processes whose CPU time part 3 measures (and the client worker itself).
CPU_GROUPS = ("validator", "executors", "backends", "client")
#: The last run's raw results.
RAW = Path(tempfile.gettempdir()) / "lloom-bench-nat.json"

#: Model served by a backend without delay (part 1, 2) and one with a per-word delay (3).
FAST, SLOW = "bench-fast", "bench-slow"
#: Words (streamed chunks with content) of every answer.
TOKENS = 48
REPLY = " ".join(f"w{i}" for i in range(TOKENS))
#: The slow backend's delay before each word, ms.
TOKEN_DELAY_MS = 20
#: Relayed executors behind the NAT router.
RELAYED = 4
#: Part 1: interleaved requests per path (after ``WARMUP``), new connections per path.
LATENCY_N = 20 if QUICK else 200
WARMUP = 10
COLD_N = 3 if QUICK else 20
#: Part 2: executor starts per path.
START_RUNS = 1 if QUICK else 4
#: Part 3: clients at once, seconds each level is measured, idle seconds measured before.
LEVELS = tuple(
    int(n) for n in os.environ.get("BENCH_NAT_LEVELS", "4,8" if QUICK else "4,8,32,64").split(",")
)
LOAD_SECS = 3.0 if QUICK else 8.0
IDLE_SECS = 2.0 if QUICK else 3.0


# --- processes in namespaces -----------------------------------------------------------


def cpu_secs(pid: int | str = "self") -> float:
    """User + system CPU time of a process in seconds (``/proc/<pid>/stat``)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()  # the command name may contain spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy() -> float:
    """CPU seconds this machine has been busy, all cores (``/proc/stat``: all but idle and
    iowait)."""
    cols = [int(c) for c in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(cols) - cols[3] - cols[4]) / os.sysconf("SC_CLK_TCK")


def net_counters(pid: int, dev: str = "eth0") -> dict[str, float]:
    """Bytes and packets received and sent by ``dev`` in the network namespace of process
    ``pid`` (``/proc/<pid>/net/dev``)."""
    for line in Path(f"/proc/{pid}/net/dev").read_text().splitlines():
        name, sep, rest = line.partition(":")
        if sep and name.strip() == dev:
            cols = [float(c) for c in rest.split()]
            return {"rx": cols[0], "rx_packets": cols[1], "tx": cols[8], "tx_packets": cols[9]}
    raise RuntimeError(f"no {dev} in the namespace of {pid}")


@dataclass
class Child:
    """A process started in a namespace host; its output lines, stamped on arrival
    (``time.monotonic()``)."""

    name: str
    popen: subprocess.Popen[bytes]
    started: float
    out: list[tuple[float, str]] = field(default_factory=list)
    err: list[tuple[float, str]] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)
    ended: int = 0

    @property
    def pid(self) -> int:
        """The program's PID (``ip netns exec`` execs it)."""
        return self.popen.pid

    def read(self, pipe: Any, into: list[tuple[float, str]]) -> None:
        """Collect the lines of ``pipe`` until it ends (a reader thread)."""
        for raw in iter(pipe.readline, b""):
            stamp = time.monotonic()
            with self.changed:
                into.append((stamp, raw.decode(errors="replace").rstrip("\n")))
                self.changed.notify_all()
        with self.changed:
            self.ended += 1
            self.changed.notify_all()

    def wait_line(
        self, predicate: Callable[[str], bool], timeout: float, stderr: bool = False
    ) -> tuple[float, str]:
        """The first line (stamped) of stdout or stderr matching ``predicate``."""
        lines = self.err if stderr else self.out
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for stamp, line in lines:
                    if predicate(line):
                        return stamp, line
                left = deadline - time.monotonic()
                if left <= 0 or self.ended == 2:
                    raise RuntimeError(
                        f"{self.name}: no expected line within {timeout:g} s "
                        f"(exit {self.popen.poll()})\n{self.tail()}"
                    )
                self.changed.wait(left)

    def ready(self, timeout: float = 60.0) -> tuple[float, ReadyLine]:
        """When the ready line arrived, and the line."""
        stamp, line = self.wait_line(lambda s: s.startswith("ready "), timeout)
        return stamp, ReadyLine.parse(line)

    def tail(self) -> str:
        """The last lines of stderr, for error messages."""
        with self.changed:
            return "\n".join(line for _, line in self.err[-30:])

    def stop(self) -> None:
        """SIGINT, then SIGTERM, then SIGKILL, by PID; reap."""
        for sig, grace in ((signal.SIGINT, 5.0), (signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
            if self.popen.poll() is not None:
                break
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                continue


class Children:
    """Every process this benchmark starts; :meth:`stop_all` stops them by PID."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.all: list[Child] = []

    def env(self, name: str) -> dict[str, str]:
        """A child's environment: its own data dir, unbuffered output."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLOOM_")}
        env["LLOOM_DATA_DIR"] = str(self.tmp / name / "data")
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def start(self, name: str, host: Host, argv: Sequence[str]) -> Child:
        """Start ``argv`` inside ``host``."""
        started = time.monotonic()
        popen = subprocess.Popen(
            netns_argv(host, argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env(name),
            cwd=ROOT,
        )
        child = Child(name, popen, started)
        self.all.append(child)
        for pipe, into in ((popen.stdout, child.out), (popen.stderr, child.err)):
            threading.Thread(target=child.read, args=(pipe, into), daemon=True).start()
        return child

    def stop(self, child: Child) -> None:
        """Stop one child and forget it."""
        child.stop()
        self.all.remove(child)

    def stop_all(self) -> None:
        """Stop every child, newest first."""
        for child in reversed(self.all):
            child.stop()
        self.all.clear()


def start_mock(children: Children, host: Host, name: str, model: str, delay_ms: int) -> str:
    """A mock backend serving ``model`` on ``host``'s 127.0.0.1; its /v1 URL."""
    argv = [sys.executable, "-m", "tests.support.mock_openai", "--models", model]
    argv += ["--reply", REPLY, "--chunk-delay-ms", str(delay_ms)]
    child = children.start(name, host, argv)
    _, line = child.wait_line(lambda s: s.startswith("ready url="), 30)
    return line.removeprefix("ready url=")


def start_executor(
    children: Children, host: Host, name: str, boot: str, backends: dict[str, str]
) -> Child:
    """``lloom-executor`` on ``host``'s address, one backend per model (model → URL);
    not awaited."""
    root = children.tmp / name
    root.mkdir(parents=True, exist_ok=True)
    text = f'[node]\nlisten = ["/ip4/{host.ip}/tcp/0"]\ndata_dir = "{root / "state"}"\n'
    for model, url in backends.items():
        text += f'\n[[backends]]\nname = "{model}"\nbase_url = "{url}"\nmodels = ["{model}"]\n'
    (root / "config.toml").write_text(text)
    argv = [str(BIN / "lloom-executor"), "--bootstrap-nodes", boot]
    return children.start(name, host, [*argv, "--config", str(root / "config.toml")])


def run_worker(
    children: Children, host: Host, mode: str, args: dict[str, Any], timeout: float
) -> dict[str, Any]:
    """Run ``python -m bench.nat worker MODE JSON`` in ``host``; its JSON result."""
    argv = [sys.executable, "-m", "bench.nat", "worker", mode, json.dumps(args)]
    child = children.start(f"worker-{mode}", host, argv)
    try:
        _, line = child.wait_line(lambda s: s.startswith(MARK), timeout)
    finally:
        children.stop(child)
    result: dict[str, Any] = json.loads(line.removeprefix(MARK))
    return result


# --- the client side: a worker process in the client's namespace --------------------------


def chat(model: str) -> llm.Request:
    """The streamed request every part sends."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    return llm.Request(llm.RequestKind.CHAT, body)


@dataclass
class Sample:
    """One streamed answer: seconds to the first word and to the end, chunks, path."""

    first: float
    total: float
    chunks: int
    path: str


async def timed(
    node: Node,
    info: PeerInfo,
    request: llm.Request,
    pool: StreamPool | None,
    on_chunk: Callable[[float, bool], None] | None = None,
) -> Sample:
    """Send ``request`` to ``info`` and time it (``on_chunk`` gets each chunk's time and
    whether it carries a word)."""
    start = time.perf_counter()
    first = 0.0
    chunks = 0

    async def chunk(data: dict[str, Any]) -> None:
        nonlocal first, chunks
        now = time.perf_counter()
        chunks += 1
        word = bool(data["choices"] and data["choices"][0]["delta"].get("content"))
        if on_chunk is not None:
            on_chunk(now, word)
        if not first and word:
            first = now - start

    result = await send_request(node, info, request, chunk, pool=pool)
    return Sample(first, time.perf_counter() - start, chunks, result.path)


def client_config(boot: str | None = None) -> NodeConfig:
    """A client host: no hole punching (relayed stays relayed), bootstrapped when asked."""
    return NodeConfig(bootstrap=[Multiaddr(boot)] if boot else [], hole_punch=False)


async def lookup(node: Node, model: str, want: Sequence[str]) -> list[PeerInfo]:
    """The ``PeerInfo`` of each PeerId of ``want`` as a lookup of ``model`` returns it
    (asked again until all are found, within 30 s)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            found = {str(i.peer_id): i for i in await find_executors(node, model)}
        except LloomError:
            found = {}
        if all(p in found for p in want):
            return [found[p] for p in want]
        if time.monotonic() > deadline:
            raise RuntimeError(f"lookup of {model} found {sorted(found)}, not all of {want}")
        await trio.sleep(0.5)


async def latency(args: dict[str, Any]) -> dict[str, Any]:
    """Part 1: the same request to the direct and the relayed executor, interleaved."""
    request = chat(FAST)
    names = ("direct", "relayed")
    out: dict[str, Any] = {n: {"first": [], "total": [], "chunks": []} for n in names}
    for n in names:
        out[n] |= {"dial": [], "cold_first": []}
    paths: Counter[str] = Counter()
    async with open_node(Identity.generate(), client_config(args["boot"])) as node:
        infos = dict(zip(names, await lookup(node, FAST, args["peers"]), strict=True))
        out["addrs"] = {n: [str(a) for a in infos[n].addrs] for n in names}
        for _ in range(args["cold"]):
            for name in names:
                async with open_node(Identity.generate(), client_config()) as fresh:
                    start = time.perf_counter()
                    await fresh.connect(infos[name])
                    dial = time.perf_counter() - start
                    sample = await timed(fresh, infos[name], request, None)
                    out[name]["dial"].append(dial)
                    out[name]["cold_first"].append(dial + sample.first)
                    paths[f"{name}:{sample.path}"] += 1
        pool = StreamPool(node, max_idle_per_peer=4)
        for name in names:
            await node.connect(infos[name])
            for _ in range(args["warmup"]):
                await timed(node, infos[name], request, pool)
        for _ in range(args["n"]):
            for name in names:
                sample = await timed(node, infos[name], request, pool)
                out[name]["first"].append(sample.first)
                out[name]["total"].append(sample.total)
                out[name]["chunks"].append(sample.chunks)
                paths[f"{name}:{sample.path}"] += 1
    out["paths"] = dict(paths)
    return out


@dataclass
class Window:
    """The measured window of one load level: chunks counted while it is open."""

    t0: float = float("inf")
    t1: float = float("inf")
    chunks: int = 0
    closed: bool = False

    def inside(self, now: float) -> bool:
        """Whether ``now`` is in the window."""
        return self.t0 <= now < self.t1


@dataclass
class Watch:
    """One answer of a load level: counts its chunks into the window and notes the time to
    its first word when it began inside the window."""

    window: Window
    firsts: list[float]
    start: float = field(default_factory=time.perf_counter)
    word_seen: bool = False

    def __call__(self, now: float, word: bool) -> None:
        """A chunk arrived at ``now`` (``word``: it carries one)."""
        if self.window.inside(now):
            self.window.chunks += 1
            if word and not self.word_seen and self.start >= self.window.t0:
                self.firsts.append(now - self.start)
        self.word_seen = self.word_seen or word


def snapshot(pids: dict[str, list[int]], validator: int) -> dict[str, float]:
    """CPU seconds of each group of processes (and of this one), validator's bytes."""
    out = {name: sum(cpu_secs(p) for p in group) for name, group in pids.items()}
    out["client"] = cpu_secs()
    out["machine"] = machine_busy()
    return out | net_counters(validator)


def error_name(exc: BaseException) -> str:
    """A short class of a failed request, for counting."""
    if isinstance(exc, RemoteError):
        return f"RemoteError {exc.code}"
    return type(exc).__name__


async def load_level(infos: list[PeerInfo], clients: int, args: dict[str, Any]) -> dict[str, Any]:
    """Part 3, one level: ``clients`` client hosts, each streaming answers from one relayed
    executor back to back, the first staggered over one answer's time."""
    request = chat(SLOW)
    ideal = TOKENS * TOKEN_DELAY_MS / 1000
    errors: Counter[str] = Counter()
    examples: dict[str, str] = {}
    paths: Counter[str] = Counter()
    firsts: list[float] = []
    totals: list[float] = []
    window = Window()
    answers = 0
    began = time.perf_counter()
    async with AsyncExitStack() as stack:
        nodes = [
            await stack.enter_async_context(open_node(Identity.generate(), client_config()))
            for _ in range(clients)
        ]
        pools = [StreamPool(n, max_idle_per_peer=1) for n in nodes]
        targets = [infos[i % len(infos)] for i in range(clients)]

        async def warm(i: int) -> None:
            try:
                await timed(nodes[i], targets[i], request, pools[i])
            except Exception as exc:  # counted, and the client tries again when measured
                errors[f"warm-up {error_name(exc)}"] += 1
                examples.setdefault(f"warm-up {error_name(exc)}", str(exc)[:300])

        opened = time.perf_counter() - began
        async with trio.open_nursery() as nursery:
            for i in range(clients):
                nursery.start_soon(warm, i)
        warmed = time.perf_counter() - began - opened

        async def client(i: int) -> None:
            nonlocal answers
            await trio.sleep(random.uniform(0, ideal))
            while not window.closed:
                watch = Watch(window, firsts)
                start = watch.start
                try:
                    sample = await timed(nodes[i], targets[i], request, pools[i], watch)
                except Exception as exc:  # counted: relay refusals, busy executors, timeouts
                    errors[error_name(exc)] += 1
                    examples.setdefault(error_name(exc), str(exc)[:300])
                    await trio.sleep(0.1)
                    continue
                paths[sample.path] += 1
                if start >= window.t0 and time.perf_counter() <= window.t1:
                    answers += 1
                    totals.append(sample.total)

        before: dict[str, float] = {}
        after: dict[str, float] = {}

        async def meter() -> None:
            await trio.sleep(ideal + 0.5)  # every client under way
            before.update(snapshot(args["pids"], args["validator"]))
            window.t0 = time.perf_counter()
            await trio.sleep(args["secs"])
            window.t1 = time.perf_counter()
            after.update(snapshot(args["pids"], args["validator"]))
            window.closed = True

        async with trio.open_nursery() as nursery:
            for i in range(clients):
                nursery.start_soon(client, i)
            await meter()
            nursery.cancel_scope.cancel()  # answers under way are cut: not counted
    return {
        "clients": clients,
        "executors": len(infos),
        "secs": window.t1 - window.t0,
        "chunks": window.chunks,
        "answers": answers,
        "first": firsts,
        "total": totals,
        "errors": dict(errors),
        "examples": examples,
        "paths": dict(paths),
        "delta": {k: after[k] - before[k] for k in before},
        "setup": {"open": opened, "warm": warmed, "all": time.perf_counter() - began},
    }


async def load(args: dict[str, Any]) -> dict[str, Any]:
    """Part 3: the validator idle, then each level in turn."""
    async with open_node(Identity.generate(), client_config(args["boot"])) as node:
        infos = await lookup(node, SLOW, args["peers"])
    start = cpu_secs(args["validator"])
    await trio.sleep(args["idle"])
    idle = (cpu_secs(args["validator"]) - start) / args["idle"]
    levels = [await load_level(infos, n, args) for n in args["levels"]]
    return {"idle_cpu_per_s": idle, "levels": levels}


def worker_main(argv: list[str]) -> None:
    """``worker MODE JSON``: run one part and print its result after :data:`MARK`."""
    configure_logging(0)
    mode, args = argv[0], json.loads(argv[1])
    run = {"latency": latency, "load": load}[mode]
    print(MARK + json.dumps(trio.run(run, args)), flush=True)


# --- the parent: topology, processes, report ----------------------------------------------


def starts(
    children: Children, hosts: dict[str, Host], urls: dict[str, str], boot: str, runs: int
) -> dict[str, dict[str, list[float]]]:
    """Part 2: start executors one at a time, alternating direct and relayed; seconds
    from process start to the reachability verdict, to the reservation, to ready."""
    out: dict[str, dict[str, list[float]]] = {
        path: {"verdict": [], "reserved": [], "ready": [], "reservation": []} for path in hosts
    }
    for run in range(runs):
        for path, host in hosts.items():
            child = start_executor(children, host, f"start-{path}-{run}", boot, {FAST: urls[path]})
            ready_at, ready = child.ready()
            if ready.get("path") != path:
                raise RuntimeError(f"{child.name} came up {ready.get('path')}, not {path}")
            verdict, _ = child.wait_line(lambda s: "reachability: " in s, 5, stderr=True)
            times = out[path]
            times["verdict"].append(verdict - child.started)
            times["ready"].append(ready_at - child.started)
            if path == "relayed":
                held, _ = child.wait_line(lambda s: "relay reservation on" in s, 5, stderr=True)
                times["reserved"].append(held - child.started)
                times["reservation"].append(held - verdict)
            children.stop(child)
    return out


def rtt_ms(host: Host, ip: str) -> float:
    """Mean ping round trip from ``host`` to ``ip``, ms."""
    done = subprocess.run(
        netns_argv(host, ["ping", "-q", "-c", "10", "-i", "0.02", ip]),
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    )
    # "rtt min/avg/max/mdev = 0.031/0.045/0.080/0.012 ms"
    return float(done.stdout.rsplit("=", 1)[1].split("/")[1])


def measure(net: Topology, children: Children) -> dict[str, Any]:
    """Build the topology, start every process, run the three parts."""
    wan = net.subnet("wan")
    home = net.subnet("home")
    router = net.router("router", wan, home, block_inbound=True)
    vhost = net.host("validator", wan)
    chost = net.host("client", wan)
    dhost = net.host("direct", wan)
    rhosts = [net.behind(f"relayed{i + 1}", router) for i in range(RELAYED)]

    validator = children.start(
        "validator",
        vhost,
        [str(BIN / "lloom-validator"), "--listen-address", f"/ip4/{vhost.ip}/tcp/0"],
    )
    _, vready = validator.ready()
    if vready.get("relay") != "on":
        raise RuntimeError(f"the validator does not relay: {vready}")
    boot = vready.listen[0]

    fast = {
        "direct": start_mock(children, dhost, "mock-direct", FAST, 0),
        "relayed": start_mock(children, rhosts[0], "mock-relayed1-fast", FAST, 0),
    }
    slow = [start_mock(children, h, f"mock-{h.label}-slow", SLOW, TOKEN_DELAY_MS) for h in rhosts]

    start_times = starts(children, {"direct": dhost, "relayed": rhosts[0]}, fast, boot, START_RUNS)

    direct = start_executor(children, dhost, "direct", boot, {FAST: fast["direct"]})
    relayed = [
        start_executor(
            children,
            h,
            h.label,
            boot,
            ({FAST: fast["relayed"]} if i == 0 else {}) | {SLOW: slow[i]},
        )
        for i, h in enumerate(rhosts)
    ]
    readies = {c.name: c.ready()[1] for c in (direct, *relayed)}
    for name, ready in readies.items():
        want = "direct" if name == "direct" else "relayed"
        if ready.get("path") != want:
            raise RuntimeError(f"executor {name} came up {ready.get('path')}, not {want}")

    lat = run_worker(
        children,
        chost,
        "latency",
        {
            "boot": boot,
            "peers": [readies["direct"].peer_id, readies[rhosts[0].label].peer_id],
            "n": LATENCY_N,
            "warmup": WARMUP,
            "cold": COLD_N,
        },
        timeout=300,
    )
    mocks = [c.pid for c in children.all if c.name.endswith("-slow")]
    loaded = run_worker(
        children,
        chost,
        "load",
        {
            "boot": boot,
            "peers": [readies[h.label].peer_id for h in rhosts],
            "levels": list(LEVELS),
            "secs": LOAD_SECS,
            "idle": IDLE_SECS,
            "validator": validator.pid,
            "pids": {
                "validator": [validator.pid],
                "executors": [c.pid for c in relayed],
                "backends": mocks,
            },
        },
        timeout=120 + len(LEVELS) * (LOAD_SECS + 60),
    )
    relay_log = [line for _, line in validator.err if "relay:" in line]
    return {
        "rtt": {"client": rtt_ms(chost, vhost.ip), "relayed": rtt_ms(rhosts[0], vhost.ip)},
        "starts": start_times,
        "latency": lat,
        "load": loaded,
        "relay_log": relay_log,
        "executors_log": [
            line for c in relayed for _, line in c.err if "WARNING" in line or "ERROR" in line
        ],
    }


def main() -> None:
    """Run the NAT traversal benchmark and write its section."""
    reason = available()
    if reason is not None:
        body = f"Not measured: {reason}."
        write_section(SECTION, body)
        print(body)
        return
    with tempfile.TemporaryDirectory() as tmpdir, topology() as net:
        children = Children(Path(tmpdir))
        try:
            results = measure(net, children)
        finally:
            children.stop_all()
    RAW.write_text(json.dumps(results))  # to render again without measuring again
    body = render(results)
    write_section(SECTION, body)
    print(body)
    for line in results["relay_log"][-10:] + results["executors_log"][-10:]:
        print("log:", line)
    for level in results["load"]["levels"]:
        print(f"load level {level['clients']}: setup seconds {level['setup']}")
        for name, text in level["examples"].items():
            print(f"  {name}: {text}")


# --- the report ------------------------------------------------------------------------


def p50(values: Sequence[float]) -> float:
    """The median of durations in seconds, in ms."""
    return Stats.of(list(values)).p50


def fmt_errors(errors: dict[str, int]) -> str:
    """Counted errors as ``name n, …``, or 0."""
    return ", ".join(f"{k} {v}" for k, v in sorted(errors.items())) or "0"


def render_latency(lat: dict[str, Any], rtt: dict[str, float]) -> str:
    """Part 1."""
    d, r = lat["direct"], lat["relayed"]
    rows = [
        Stats.of(d["first"]).row("time to first token, direct (warm)"),
        Stats.of(r["first"]).row("time to first token, relayed (warm)"),
        Stats.of(d["total"]).row(f"whole answer ({TOKENS} words), direct (warm)"),
        Stats.of(r["total"]).row(f"whole answer ({TOKENS} words), relayed (warm)"),
        Stats.of(d["dial"]).row("dial (new connection), direct"),
        Stats.of(r["dial"]).row("dial (new connection), relayed"),
        Stats.of(d["cold_first"]).row("dial + first token (new connection), direct"),
        Stats.of(r["cold_first"]).row("dial + first token (new connection), relayed"),
    ]
    added = []
    for key, name in (
        ("first", "time to first token (warm)"),
        ("total", f"whole answer, {TOKENS} words (warm)"),
        ("dial", "dial"),
        ("cold_first", "dial + first token"),
    ):
        a, b = Stats.of(r[key]), Stats.of(d[key])
        added.append(f"| {name} | {a.p50 - b.p50:+.2f} | {a.p90 - b.p90:+.2f} |")
    paths = ", ".join(f"{k} {v}" for k, v in sorted(lat["paths"].items()))
    return f"""
**1. Relayed against direct.** The same streamed request ({TOKENS}-word answer, backend
without delay) to D and to R1: {LATENCY_N} of each, interleaved, after {WARMUP} warm-up
requests each, on one warm connection reusing request streams; and {COLD_N} times each on a
new connection (a new client host dials, then asks). Ping round trip client → validator
{rtt["client"]:.3f} ms, R1 → validator through its NAT router {rtt["relayed"]:.3f} ms: the
wire adds next to nothing, so the difference is the relay's processing. Paths as the
client saw them (executor: path): {paths}.

{STATS_HEADER}
{chr(10).join(rows)}

Added by the relay (relayed minus direct):

| measurement | added p50 ms | added p90 ms |
|---|---|---|
{chr(10).join(added)}
"""


def render_starts(st: dict[str, dict[str, list[float]]]) -> str:
    """Part 2."""
    rows = [
        Stats.of(st["direct"]["verdict"]).row("process start → reachability verdict, direct"),
        Stats.of(st["relayed"]["verdict"]).row("process start → reachability verdict, relayed"),
        Stats.of(st["relayed"]["reservation"]).row("verdict → relay reservation held"),
        Stats.of(st["direct"]["ready"]).row("process start → ready line, direct"),
        Stats.of(st["relayed"]["ready"]).row("process start → ready line (path=relayed)"),
    ]
    return f"""
**2. Start to ready.** {START_RUNS} starts each, alternating, of a new executor (new
identity, same config) in D's and in R1's namespace, each stopped once ready; its stderr
lines are stamped as they arrive: the verdict is the `reachability: …` line (after
bootstrap and the AutoNAT dial-back question), the reservation the `relay reservation on
…` line (one HOP stream: RESERVE and its answer).

{STATS_HEADER}
{chr(10).join(rows)}
"""


def render_load(ld: dict[str, Any], per_answer: float) -> tuple[str, list[float]]:
    """Part 3; also the validator's CPU seconds per 1,000 chunks of each level."""
    ideal = TOKENS * TOKEN_DELAY_MS / 1000
    delivery = [
        "| clients at once | chunks/s offered | chunks/s delivered | delivered "
        "| answers | first token p50 / p90 ms (n) | answer p50 / p90 s | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    costs = [
        "| clients at once | validator CPU s / 1,000 chunks | validator CPU % of a core "
        "| measured processes / whole machine CPU % (of 200) "
        "| executors CPU s / 1,000 | client CPU s / 1,000 "
        "| validator bytes out / chunk | validator packets out / chunk |",
        "|---|---|---|---|---|---|---|---|",
    ]
    validator_cost = []
    for lv in ld["levels"]:
        chunks, secs, delta = lv["chunks"], lv["secs"], lv["delta"]
        offered = lv["clients"] * per_answer / ideal
        delivered = chunks / secs
        k = 1000 / max(chunks, 1)
        vcpu = (delta["validator"] - ld["idle_cpu_per_s"] * secs) * k
        validator_cost.append(vcpu)
        every = sum(delta[g] for g in CPU_GROUPS)
        if lv["first"]:
            f = Stats.of(lv["first"])
            times = f"{f.p50:.0f} / {f.p90:.0f} ({f.n})"
        else:
            times = "- (0)"
        if lv["total"]:
            t = Stats.of(lv["total"])
            times += f" | {t.p50 / 1000:.2f} / {t.p90 / 1000:.2f}"
        else:
            times += " | -"
        delivery.append(
            f"| {lv['clients']} | {offered:.0f} | {delivered:.0f} | {delivered / offered:.0%} "
            f"| {lv['answers']} | {times} | {fmt_errors(lv['errors'])} |"
        )
        costs.append(
            f"| {lv['clients']} | {vcpu:.2f} | {delta['validator'] / secs:.0%} "
            f"| {every / secs:.0%} / {delta['machine'] / secs:.0%} "
            f"| {delta['executors'] * k:.2f} | {delta['client'] * k:.2f} "
            f"| {delta['tx'] * k / 1000:.0f} | {delta['tx_packets'] * k / 1000:.1f} |"
        )
    paths: Counter[str] = Counter()
    for lv in ld["levels"]:
        paths.update(lv["paths"])
    text = f"""
**3. What one validator relays.** Clients at once, one client host with one stream each
(so one circuit each), spread evenly over R1…R{RELAYED} (each with the default
`max_concurrent_requests` 16), asking back to back; the backends send one word every
{TOKEN_DELAY_MS} ms ({TOKENS} words, {per_answer:.0f} chunk frames per answer; an ideal
answer takes {ideal:.2f} s, and its first word comes after {TOKEN_DELAY_MS} ms). Offered =
what the backends would send with no overhead (clients x {per_answer:.0f} chunks /
{ideal:.2f} s); delivered = chunks the clients received in a {LOAD_SECS:.0f} s window;
answers = those begun and ended inside it (answers still running at its end are cut);
first token = of the answers begun inside it.
Paths of the answers: {", ".join(f"{k} {v}" for k, v in sorted(paths.items()))}.

{chr(10).join(delivery)}

Cost over the same window, per 1,000 chunks delivered, from `/proc/<pid>/stat` (the
validator's idle {ld["idle_cpu_per_s"] * 100:.1f}% of a core subtracted) and the
validator's interface counters (bytes and packets it sent: each chunk, the end frames, and
the acknowledgements and window updates going back to the executors). Whole machine =
`/proc/stat`; above the measured processes' share it counts other work on the machine:

{chr(10).join(costs)}
"""
    return text, validator_cost


def render(r: dict[str, Any]) -> str:
    """The section body."""
    lat, st, ld = r["latency"], r["starts"], r["load"]
    d, rl = lat["direct"], lat["relayed"]
    per_answer = statistics.median(rl["chunks"])
    load_text, cost = render_load(ld, per_answer)
    refusals = [line for line in r["relay_log"] if "refused" in line]
    refusal_note = (
        f"The validator refused {len(refusals)} reservation(s) or circuit(s), the last: "
        f"`{refusals[-1].split(': ', 1)[-1]}`."
        if refusals
        else "The validator refused no reservation or circuit (no `relay: refused` log line)."
    )
    ideal = TOKENS * TOKEN_DELAY_MS / 1000
    per_core = 1000 / min(cost) if cost and min(cost) > 0 else float("nan")
    top = ld["levels"][-1]
    top_offered = top["clients"] * per_answer / ideal
    top_rate = top["chunks"] / top["secs"]
    top_cpu = sum(top["delta"][g] for g in CPU_GROUPS)
    busy = top["delta"]["machine"] / top["secs"]
    outcome = (
        f"At {top['clients']} clients the validator delivered {top_rate:.0f} of "
        f"{top_offered:.0f} chunks/s offered ({top_rate / top_offered:.0%}) "
    )
    if top_rate >= 0.9 * top_offered:
        outcome += "."
    elif busy >= 1.8:
        outcome += (
            f"because the machine was saturated ({busy:.0%} of 200% busy, the measured "
            f"processes {top_cpu / top['secs']:.0%}, the validator "
            f"{top['delta']['validator'] / top['secs']:.0%} of a core): every relayed chunk "
            "also costs CPU in the executor, the backend and the client on the same two "
            "cores, so this is the machine's limit, not a relay limit."
        )
    else:
        outcome += f"with the machine {busy:.0%} of 200% busy."
    others = max(
        (lv["delta"]["machine"] - sum(lv["delta"][g] for g in CPU_GROUPS)) / lv["secs"]
        for lv in ld["levels"]
    )
    if others > 0.2:
        outcome += (
            f" Other work shared the machine during this run (up to {others:.0%} of 200% "
            "beside the measured processes in part 3), so every figure here is one of a "
            "loaded machine."
        )
    ready_gap = p50(st["relayed"]["ready"]) - p50(st["direct"]["ready"])
    verdict_gap = p50(st["relayed"]["verdict"]) - p50(st["direct"]["verdict"])
    warm_added = p50(rl["total"]) - p50(d["total"])
    return f"""
Linux network namespaces (`tests/support/netns.py`): a validator, a client host and
executor D on one public subnet; executors R1…R{RELAYED} behind a NAT router that lets no new
connection in, so they reserve on the validator and serve through its relay
(`path=relayed`). Every executor is a real `lloom-executor` in front of its own mock backend
on its namespace's 127.0.0.1; the client side is a worker process in the client's namespace
using the client library (`send_request`) with the `PeerInfo` a lookup returned. Clients run
without hole punching, so relayed stays relayed (checked on every answer). A relayed chunk
crosses the validator's process: Noise and Yamux off the executor's connection, on to the
client's, and inside them the client's and executor's own Noise and Yamux of the circuit.
Every process shares the machine's 2 cores.
{render_latency(lat, r["rtt"])}
{render_starts(st)}
{load_text}
{refusal_note}

**Reading.** The relay adds {p50(rl["first"]) - p50(d["first"]):.1f} ms to the first token
of a request on a warm connection (p50) and {warm_added:.1f} ms to a whole {TOKENS}-word
answer sent without pause, and
{p50(rl["cold_first"]) - p50(d["cold_first"]):.0f} ms to the first request on a new
connection (the relayed dial: a connection to the validator, HOP CONNECT, then Noise and
Yamux inside the circuit). Being behind NAT does not slow an executor's start: it was ready
{abs(ready_gap):.0f} ms {"later" if ready_gap > 0 else "sooner"} than a direct one (p50) of
a ~{p50(st["direct"]["ready"]) / 1000:.1f} s start; its reachability verdict came
{abs(verdict_gap):.0f} ms {"later" if verdict_gap > 0 else "sooner"} (its private addresses
are refused without a dial-back) and the reservation round trip adds
{p50(st["relayed"]["reservation"]):.0f} ms. Per chunk the relay is expensive: the validator
spends {min(cost):.2f} to {max(cost):.2f} CPU s per 1,000 relayed chunks over the levels
(that is, ms per chunk: several Noise messages and TCP packets per chunk each way), so
one core would relay at most ≈ {per_core:,.0f} chunks/s, ≈
{per_core / (1000 / TOKEN_DELAY_MS):.0f} streams at {1000 / TOKEN_DELAY_MS:.0f} words/s.
{outcome}
"""


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        worker_main(sys.argv[2:])
