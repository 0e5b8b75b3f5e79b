"""Scale simulation: many executors and clients on one DHT of a few validators.

``python -m bench scale`` starts ``VALIDATORS`` validators, each bootstrapped to the ones
started before it, then ``EXECUTORS`` executor hosts and ``CLIENTS`` client hosts, each a
full py-libp2p host (``open_node``) bootstrapped to every validator, packed into a few worker
processes (``python -m bench.scale worker ...``) that start their hosts a few at a time.
Executors only announce themselves (``Dht.provide`` of one model key) as they start and once
more when all are up (a re-provide, as executors do every 30 s); then every client looks the
key up several times. The validators' RSS and CPU time are read from ``/proc`` between
phases. Last, 10,000 requests are spread, on a simulated clock, over the providers each
client actually found, with :func:`lloom.client.spread.spread`.

Workarounds (py-libp2p 0.8.1 defaults that stopped lloom at this scale, found by this
benchmark; lloom's node layer now carries all four, see docs/node.md, so the bench's own
copies below are kept only to measure the stock behaviour where they still can):

- **Validators' connection caps.** py-libp2p's default ``ConnectionConfig`` lets a host
  keep at most 250 inbound connections (``max_connections`` 300 minus ``min_connections``
  50; the 251st is closed before the handshake) and prunes above 300; the default resource
  manager (``libp2p.rcmgr``) also stops at 256 established inbound connections, 1,000 in
  all. ``lloom-validator`` keeps the defaults, so a validator serves at most 250 executors
  and clients together. The validators here run ``lloom.validator.cli.main`` with both
  raised (``python -m bench.scale validator ...``); one unmodified ``lloom-validator`` is
  dialled by ``STOCK_DIALS`` hosts per executor worker to show the cap.
- **Peerstore size.** py-libp2p's ``PeerStore`` keeps at most 1,000 peers and evicts peers
  without addresses first, which is the host's own entry: its public key is gone, and the
  next incoming identify raises ``PeerStoreError`` through ``open_node`` and the node stops.
  A validator reaches that with its 1,001st peer. The bench's validators get a larger
  peerstore; :func:`peerstore_check` shows the stop on an unmodified node.
- **Lookup start.** See :func:`stock_lookups`; measured without the workaround with
  ``STOCK_LOOKUPS`` lookups by ``STOCK_LOOKUP_CLIENTS`` clients per worker and a re-provide
  by ``STOCK_REPROVIDES`` executors per worker.
- **AutoConnector.** Every py-libp2p host with fewer than 50 connections dials, every 10 s,
  up to 32 peers from its peerstore; an executor's peerstore holds the providers its
  confirmations returned, so executors connect to each other (33 connections each on
  average 40 s after start with 40 executors; clients connect to every executor). With
  1,000 hosts that is tens of thousands of connections on two cores; the workers stop it
  on their hosts.

``BENCH_SCALE_STOCK=1`` runs without any workaround; ``BENCH_SCALE_EXECUTORS`` and
``BENCH_SCALE_CLIENTS`` lower the counts for a trial. Everything binds 127.0.0.1; every
process started is stopped by PID.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import heapq
import json
import os
import queue
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import libp2p.kad_dht.peer_routing as peer_routing
import trio
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from multiaddr import Multiaddr

from bench import procs
from bench.report import write_section
from lloom.client.spread import spread
from lloom.dhtkeys import model_key
from lloom.errors import DiscoveryFailed
from lloom.identity import Identity
from lloom.logs import configure_logging
from lloom.node.host import SERVER_MAX_CONNECTIONS
from lloom.node.node import Node, NodeConfig, open_node
from lloom.validator import cli as validator_cli

MODEL = "bench-model"
VALIDATORS = 3
EXECUTORS = int(os.environ.get("BENCH_SCALE_EXECUTORS", "1000"))
EXECUTOR_WORKERS = 4
CLIENTS = int(os.environ.get("BENCH_SCALE_CLIENTS", "100"))
CLIENT_WORKERS = 2
#: Run without the workarounds (see the module docstring).
STOCK = os.environ.get("BENCH_SCALE_STOCK", "") == "1"
#: Lookups each client makes (the spread is simulated with the first 1, 3 and all of them).
LOOKUPS_PER_CLIENT = 10
#: Hosts a worker starts (and announces) at once.
START_CONCURRENCY = 4
#: Seconds a worker may take to start its hosts; those not up by then are not counted.
START_DEADLINE = 360.0
#: Seconds the validators are left alone with every executor connected (idle CPU).
IDLE_SECS = 10.0
#: Connections lloom's validators accept (py-libp2p's default: 300, 250 inbound).
VALIDATOR_MAX_CONNECTIONS = SERVER_MAX_CONNECTIONS
#: py-libp2p's ``MIN_PEERS_THRESHOLD`` (``kad_dht/peer_routing.py``).
STOCK_MIN_PEERS_THRESHOLD = 5
#: The checks without workarounds: clients per worker and their lookups each,
#: re-providing executors per worker, dials to an unmodified validator per executor worker.
STOCK_LOOKUP_CLIENTS = 10
STOCK_LOOKUPS = 3
STOCK_REPROVIDES = 10
STOCK_DIALS = 100
#: Re-provides and lookups by one host with nothing else running (latency without load).
ALONE = 20
#: The request-spreading simulation.
REQUESTS = 10_000
SERVICE_MEAN_SECS = 1.0
ARRIVAL_RATES = (100.0, 1000.0)
#: The gateway's discovery cache (lloom/client/network.py ``discovery_ttl``).
DISCOVERY_TTL_SECS = 10.0
MARK = "@@"

# --- small helpers shared by both sides ---------------------------------------------------


def raise_nofile() -> int:
    """Raise this process's open-file limit to its hard limit; return the new limit."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def rss_mib(pid: int | str = "self") -> float:
    """Resident set size of a process in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_secs(pid: int | str = "self") -> float:
    """User + system CPU time of a process in seconds (``/proc/<pid>/stat``)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()  # the command name may contain spaces
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime, stime (fields 14, 15)


def open_fds(pid: int | str = "self") -> int:
    """Open file descriptors of a process."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, nearest-rank; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


# --- worker processes: many hosts in one trio run -----------------------------------------


def emit(event: str, **data: Any) -> None:
    """One message to the parent on stdout."""
    print(MARK + json.dumps({"event": event, **data}), flush=True)


def read_line() -> str:
    """One line from stdin ("" at its end)."""
    return sys.stdin.readline()


def error_text(exc: BaseException) -> str:
    """A short description of an exception."""
    return f"{type(exc).__name__}: {exc}"[:200]


def stock_lookups(stock: bool) -> None:
    """Use py-libp2p's own lookup start (``stock``) or the bench's workaround.

    py-libp2p 0.8.1 starts a lookup from every connected peer and every peer in the
    peerstore when its routing table holds fewer than ``MIN_PEERS_THRESHOLD`` (5) peers,
    sorted by distance and cut at 20. Executors and clients know only the validators as DHT
    servers, so with fewer than 5 validators every lookup after the first also asks the
    executors it heard of (DHT clients: "protocol not supported"), and can leave the
    validators out altogether. The workaround starts lookups from the routing table only.
    """
    peer_routing.MIN_PEERS_THRESHOLD = STOCK_MIN_PEERS_THRESHOLD if stock or STOCK else 0


async def stop_auto_connector(node: Node) -> None:
    """Stop py-libp2p's AutoConnector on this host (see the module's workarounds)."""
    connector = getattr(node.host.get_network(), "auto_connector", None)
    if connector is not None:
        await connector.stop()


async def worker(role: str, count: int, boot: list[str], concurrency: int) -> None:
    """Run ``count`` executor or client hosts and obey the parent's commands on stdin.

    Executors announce the model key as they start. Commands:

    - ``reprovide``: every executor provides again; ``go``: every client looks the key up
      ``LOOKUPS_PER_CLIENT`` times;
    - ``reprovide-alone N`` / ``go-alone N``: the first host only, N times in a row;
    - ``reprovide-stock K`` / ``go-stock K``: K hosts at once (clients ``STOCK_LOOKUPS``
      times each) with py-libp2p's lookup start;
    - ``dial ADDR K``: K hosts connect to ADDR and stay connected; ``stop``.

    Results go to stdout as JSON lines.
    """
    key = model_key(MODEL)
    config = NodeConfig(
        listen=[Multiaddr("/ip4/127.0.0.1/tcp/0")], bootstrap=[Multiaddr(a) for a in boot]
    )
    limiter = trio.CapacityLimiter(concurrency)
    stop = trio.Event()
    nodes: list[Node] = []
    hosts: list[dict[str, Any]] = []
    all_up = trio.Event()
    rss_before = rss_mib()
    fds_before = open_fds()
    cpu_before = cpu_secs()
    stock_lookups(False)

    def counted(record: dict[str, Any]) -> None:
        hosts.append(record)
        if len(hosts) == count:
            all_up.set()

    async def host() -> None:
        record: dict[str, Any] = {"ok": False}
        await limiter.acquire()
        held = True
        try:
            start = time.perf_counter()
            async with open_node(Identity.generate(), config) as node:
                if not STOCK:
                    await stop_auto_connector(node)
                record["start"] = time.perf_counter() - start
                record["peer_id"] = str(node.peer_id)
                if role == "executor":
                    start = time.perf_counter()
                    record["ok"] = await node.dht.provide(key)
                    record["announce"] = time.perf_counter() - start
                else:
                    record["ok"] = True
                nodes.append(node)
                counted(record)
                limiter.release()
                held = False
                await stop.wait()
        except Exception as exc:  # a host that fails is counted, not fatal
            record["error"] = error_text(exc)
            counted(record)
        finally:
            if held:
                limiter.release()

    async def reprovide(node: Node, out: list[dict[str, Any]], gate: trio.CapacityLimiter) -> None:
        async with gate:
            start = time.perf_counter()
            try:
                ok = await node.dht.provide(key)
                out.append({"ok": ok, "announce": time.perf_counter() - start})
            except Exception as exc:
                out.append({"ok": False, "error": error_text(exc)})

    async def lookups(node: Node, out: list[dict[str, Any]], times: int) -> None:
        answers: list[dict[str, Any]] = []
        for _ in range(times):
            start = time.perf_counter()
            try:
                found = await node.dht.find_providers(key)
                secs = time.perf_counter() - start
                answers.append({"secs": secs, "found": [str(p.peer_id) for p in found]})
            except DiscoveryFailed as exc:
                answers.append({"secs": time.perf_counter() - start, "error": error_text(exc)})
        out.append({"peer_id": str(node.peer_id), "lookups": answers})

    async def dial(node: Node, addr: str, out: list[dict[str, Any]]) -> None:
        async with limiter:
            start = time.perf_counter()
            try:
                await node.connect(info_from_p2p_addr(Multiaddr(addr)))
                out.append({"ok": True, "secs": time.perf_counter() - start})
            except Exception as exc:
                out.append({"ok": False, "error": error_text(exc)})

    async def command() -> list[str]:
        line = await trio.to_thread.run_sync(read_line)
        return line.split() or ["stop"]

    def state() -> dict[str, Any]:
        return {
            "conns": [len(n.host.get_connected_peers()) for n in nodes],
            "known": [len(n.host.get_peerstore().peer_ids()) for n in nodes],
            "rss": rss_mib(),
            "fds": open_fds(),
        }

    async with trio.open_nursery() as nursery:
        started = time.perf_counter()
        for _ in range(count):
            nursery.start_soon(host)
        with trio.move_on_after(START_DEADLINE):
            await all_up.wait()
        emit(
            "ready",
            role=role,
            wall=time.perf_counter() - started,
            hosts=list(hosts),
            rss_before=rss_before,
            rss_after=rss_mib(),
            fds_before=fds_before,
            fds_after=open_fds(),
            cpu=cpu_secs() - cpu_before,
            nofile=resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            **state(),
        )
        while (cmd := await command())[0] != "stop":
            out: list[dict[str, Any]] = []
            started = time.perf_counter()
            name, args = cmd[0], cmd[1:]
            stock_lookups(name.endswith("-stock"))
            some = list(nodes[: int(args[-1])] if args else nodes)
            if name == "reprovide-alone":  # the first host, N times in a row
                for _ in range(int(args[0])):
                    await reprovide(nodes[0], out, limiter)
            elif name == "go-alone":
                await lookups(nodes[0], out, int(args[0]))
            async with trio.open_nursery() as inner:
                for node in some:
                    if name == "reprovide":
                        inner.start_soon(reprovide, node, out, limiter)
                    elif name == "reprovide-stock":
                        inner.start_soon(reprovide, node, out, trio.CapacityLimiter(len(some)))
                    elif name == "go":
                        inner.start_soon(lookups, node, out, LOOKUPS_PER_CLIENT)
                    elif name == "go-stock":
                        inner.start_soon(lookups, node, out, STOCK_LOOKUPS)
                    elif name == "dial":
                        inner.start_soon(dial, node, args[0], out)
                    else:
                        break
            stock_lookups(False)
            emit(name, results=out, wall=time.perf_counter() - started, **state())
        stop.set()
        with trio.move_on_after(30):
            while nursery.child_tasks:  # noqa: ASYNC110 - hosts closing, nothing to wait on
                await trio.sleep(0.1)
        nursery.cancel_scope.cancel()


def worker_main(argv: list[str]) -> None:
    """``python -m bench.scale worker ROLE COUNT CONCURRENCY BOOT,BOOT,...``."""
    configure_logging(0)
    raise_nofile()
    role, count, concurrency, boot = argv
    trio.run(worker, role, int(count), boot.split(","), int(concurrency))
    emit("done")


def validator_main(argv: list[str]) -> None:
    """``python -m bench.scale validator ARGS``: ``lloom-validator ARGS`` with the open-files
    limit raised (lloom's validators accept ``SERVER_MAX_CONNECTIONS`` connections and keep
    ``MAX_PEERS`` peers themselves since this bench found py-libp2p's caps)."""
    raise_nofile()
    raise SystemExit(validator_cli.main(argv))


async def peerstore_check(peers: int = 1001) -> dict[str, Any]:
    """Fill an unmodified node's peerstore with ``peers`` peers, then let another node
    connect (and identify): whether its own key survived and whether it kept running."""
    out: dict[str, Any] = {"peers": peers, "own_key_kept": True, "stopped": None}
    try:
        async with open_node(Identity.generate(), NodeConfig()) as node:
            store = node.host.get_peerstore()
            for i in range(peers):
                other = ID.from_pubkey(Identity.generate().keypair.public_key)
                store.add_addrs(other, [Multiaddr(f"/ip4/127.0.0.1/tcp/{20000 + i}")], 3600)
            try:
                store.pubkey(node.peer_id)
            except Exception:
                out["own_key_kept"] = False
            async with open_node(Identity.generate(), NodeConfig()) as other_node:
                with trio.move_on_after(5):
                    await other_node.connect(
                        info_from_p2p_addr(Multiaddr(node.listen_multiaddrs()[0]))
                    )
                    await trio.sleep(2)
    except Exception as exc:
        out["stopped"] = error_text(exc)
    return out


# --- the parent: processes, phases, measurements ------------------------------------------


class Worker:
    """A worker process and the messages it sent, read by a thread."""

    def __init__(self, role: str, count: int, boot: list[str], log: Path) -> None:
        self.role = role
        argv = ["worker", role, str(count), str(START_CONCURRENCY), ",".join(boot)]
        with log.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bench.scale", *argv],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                cwd=procs.ROOT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        self.messages: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(MARK):
                self.messages.put(json.loads(line[len(MARK) :]))
        self.messages.put(None)

    def send(self, command: str) -> None:
        """Send one command line (see :func:`worker`)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def expect(self, event: str, timeout: float) -> dict[str, Any]:
        """Wait for the message ``event``."""
        deadline = time.monotonic() + timeout
        while True:
            msg = self.messages.get(timeout=max(0.1, deadline - time.monotonic()))
            if msg is None:
                raise RuntimeError(f"{self.role} worker exited before {event!r}")
            if msg["event"] == event:
                return msg

    def close(self) -> None:
        """Ask it to stop; terminate, then kill it if it does not."""
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.send("stop")
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(20)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)


def command(workers: Sequence[Worker], line: str, timeout: float = 600) -> list[dict[str, Any]]:
    """Send ``line`` to every worker and wait for all their answers."""
    for w in workers:
        w.send(line)
    return [w.expect(line.split(maxsplit=1)[0], timeout) for w in workers]


def split(total: int, parts: int) -> list[int]:
    """``total`` in ``parts`` nearly equal non-zero shares."""
    return [n for i in range(parts) if (n := total // parts + (i < total % parts))]


def start_validator(tmp: Path, name: str, boot: list[str], *, stock: bool) -> tuple[Any, str]:
    """A validator on 127.0.0.1 (``stock``: the unmodified ``lloom-validator``)."""
    args = ["--listen-address", "/ip4/127.0.0.1/tcp/0"]
    if boot:
        args += ["--bootstrap-nodes", ",".join(boot)]
    argv = (
        [str(procs.BIN / "lloom-validator"), *args]
        if stock
        else [sys.executable, "-m", "bench.scale", "validator", *args]
    )
    proc = procs.start(argv, procs.env(tmp / name), tmp / f"{name}.log")
    try:
        line = procs.wait_line(proc, "ready ")
    except Exception:
        procs.stop(proc)
        raise
    listen = next(f for f in line.split() if f.startswith("listen="))
    return proc, listen.removeprefix("listen=").split(",")[0]


@dataclasses.dataclass(frozen=True)
class Usage:
    """RSS (MiB), CPU seconds and open files of each validator at one moment."""

    rss: tuple[float, ...]
    cpu: tuple[float, ...]
    fds: tuple[int, ...]
    at: float

    @classmethod
    def now(cls, pids: Sequence[int]) -> Usage:
        """Read them from /proc."""
        return cls(
            tuple(rss_mib(p) for p in pids),
            tuple(cpu_secs(p) for p in pids),
            tuple(open_fds(p) for p in pids),
            time.monotonic(),
        )


def delta(a: Usage, b: Usage) -> tuple[float, float, float]:
    """Mean per validator from ``a`` to ``b``: RSS growth MiB, CPU s, wall s."""
    n = len(a.rss)
    return (
        sum(y - x for x, y in zip(a.rss, b.rss, strict=True)) / n,
        sum(y - x for x, y in zip(a.cpu, b.cpu, strict=True)) / n,
        b.at - a.at,
    )


@dataclasses.dataclass
class Run:
    """Everything the network part measured: the workers' messages by phase."""

    executors_ready: list[dict[str, Any]]
    clients_ready: list[dict[str, Any]]
    phases: dict[str, list[dict[str, Any]]]
    usage: dict[str, Usage]
    stock_validator_fds: int | None
    peerstore: dict[str, Any] | None
    wall: float


def run_network(tmp: Path) -> Run:
    """Start validators and workers, run the phases, stop everything."""
    started = time.monotonic()
    validators: list[Any] = []
    workers: list[Worker] = []
    phases: dict[str, list[dict[str, Any]]] = {}
    stock_fds = None
    try:
        boot: list[str] = []
        for i in range(VALIDATORS):
            proc, addr = start_validator(tmp, f"v{i}", boot, stock=STOCK)
            validators.append(proc)
            boot.append(addr)
        pids = [p.pid for p in validators]
        usage = {"start": Usage.now(pids)}
        execs = [
            Worker("executor", n, boot, tmp / f"exec-{i}.log")
            for i, n in enumerate(split(EXECUTORS, EXECUTOR_WORKERS))
        ]
        workers += execs
        ready = [w.expect("ready", START_DEADLINE + 120) for w in execs]
        usage["announced"] = Usage.now(pids)
        time.sleep(IDLE_SECS)
        usage["idle"] = Usage.now(pids)
        phases["reprovide"] = command(execs, "reprovide")
        usage["reprovided"] = Usage.now(pids)
        phases["reprovide-alone"] = command(execs[:1], f"reprovide-alone {ALONE}")
        usage["alone"] = Usage.now(pids)
        clients = [
            Worker("client", n, boot, tmp / f"client-{i}.log")
            for i, n in enumerate(split(CLIENTS, CLIENT_WORKERS))
        ]
        workers += clients
        cready = [w.expect("ready", START_DEADLINE + 120) for w in clients]
        usage["clients"] = Usage.now(pids)
        phases["go-alone"] = command(clients[:1], f"go-alone {ALONE}")
        usage["before_lookups"] = Usage.now(pids)
        phases["go"] = command(clients, "go")
        usage["looked_up"] = Usage.now(pids)
        if not STOCK:
            phases["go-stock"] = command(clients, f"go-stock {STOCK_LOOKUP_CLIENTS}")
            phases["reprovide-stock"] = command(execs, f"reprovide-stock {STOCK_REPROVIDES}")
            proc, addr = start_validator(tmp, "stock", [], stock=True)
            validators.append(proc)
            phases["dial"] = command(execs, f"dial {addr} {STOCK_DIALS}")
            time.sleep(1)
            stock_fds = open_fds(proc.pid)
    except BaseException:
        for log in sorted(tmp.glob("*.log")):  # the temporary directory goes with the error
            tail = log.read_text(errors="replace").splitlines()[-15:]
            print(f"--- {log.name}", *tail, sep="\n", file=sys.stderr)
        raise
    finally:
        for w in workers:
            w.close()
        procs.stop(*validators)
    wall = time.monotonic() - started
    peerstore = None if STOCK else trio.run(peerstore_check)
    return Run(ready, cready, phases, usage, stock_fds, peerstore, wall)


# --- the spreading simulation (pure code, simulated clock) --------------------------------


@dataclasses.dataclass(frozen=True)
class Spread:
    """How requests spread over the executors."""

    name: str
    rate: float
    known_median: float
    counts: tuple[int, ...]
    unserved: int

    def row(self) -> str:
        """A markdown table row."""
        c = self.counts
        mean = statistics.fmean(c)
        cv = statistics.pstdev(c) / mean if mean else float("nan")
        zero = sum(1 for x in c if x == 0) / len(c)
        return (
            f"| {self.name} | {self.rate:g} | {self.known_median:g} | {min(c)} | "
            f"{statistics.median(c):g} | {max(c)} | {cv:.2f} | {zero:.1%} |"
        )


def simulate(
    executors: Sequence[str],
    known_at: Callable[[int, float], Sequence[str]],
    clients: int,
    rate: float,
    rng: random.Random,
) -> tuple[collections.Counter[str], int]:
    """Spread ``REQUESTS`` requests arriving at ``rate``/s (Poisson, each from a random
    client) with :func:`spread` over what each client knows at that time
    (``known_at(client, t)``, best first); service times are exponential with mean
    ``SERVICE_MEAN_SECS``. Returns requests per executor and requests with no executor."""
    counts: collections.Counter[str] = collections.Counter({e: 0 for e in executors})
    outstanding = [collections.Counter[str]() for _ in range(clients)]
    running: list[tuple[float, int, str]] = []
    unserved = 0
    t = 0.0
    for _ in range(REQUESTS):
        t += rng.expovariate(rate)
        while running and running[0][0] <= t:
            _, client, done = heapq.heappop(running)
            outstanding[client][done] -= 1
        client = rng.randrange(clients)
        known = known_at(client, t)
        if not known:
            unserved += 1
            continue
        chosen = spread(known, outstanding[client], rng=rng)[0]
        outstanding[client][chosen] += 1
        counts[chosen] += 1
        heapq.heappush(running, (t + rng.expovariate(1 / SERVICE_MEAN_SECS), client, chosen))
    return counts, unserved


def first_seen(answers: Sequence[Sequence[str]]) -> list[str]:
    """The union of several answers, in order of first appearance."""
    return list(dict.fromkeys(p for answer in answers for p in answer))


def fixed(sets: list[list[str]]) -> Callable[[int, float], Sequence[str]]:
    """What each client knows, the same all the time."""
    return lambda client, _t: sets[client]


def spreads(executors: Sequence[str], answers: Sequence[Sequence[Sequence[str]]]) -> list[Spread]:
    """Every spreading case: union of the first 1, 3 and all lookups of each client, the
    gateway's refresh (each ``DISCOVERY_TTL_SECS`` the next answer replaces the last), and
    a client that knows every executor."""
    rng = random.Random(20261203)
    n = len(answers)
    cases: list[tuple[str, Callable[[int, float], Sequence[str]], float]] = []
    for k in sorted({1, 3, LOOKUPS_PER_CLIENT}):
        sets = [first_seen(a[:k]) for a in answers]
        cases.append(
            (
                f"union of {k} lookup{'s' if k > 1 else ''} per client",
                fixed(sets),
                statistics.median(len(s) for s in sets),
            )
        )
    cases.append(
        (
            f"gateway: next lookup every {DISCOVERY_TTL_SECS:g} s replaces the last",
            lambda c, t: (
                answers[c][int(t // DISCOVERY_TTL_SECS) % len(answers[c])] if answers[c] else []
            ),
            statistics.median(len(a[0]) if a else 0 for a in answers),
        )
    )
    everyone = []
    for _ in range(n):
        order = list(executors)
        rng.shuffle(order)  # each client ranks them its own way
        everyone.append(order)
    cases.append(("every client knows every executor", fixed(everyone), len(executors)))
    out = []
    for rate in ARRIVAL_RATES:
        for name, known_at, known_median in cases:
            counts, unserved = simulate(executors, known_at, n, rate, rng)
            out.append(Spread(name, rate, known_median, tuple(counts.values()), unserved))
    return out


# --- the report ---------------------------------------------------------------------------


def ms_row(name: str, secs: Sequence[float], ok: int, total: int) -> str:
    """A table row of durations: n, ok, p50, p95, max in ms."""
    ms = [s * 1000 for s in secs]
    return (
        f"| {name} | {total} | {ok} | {quantile(ms, 0.5):.1f} | {quantile(ms, 0.95):.1f} | "
        f"{max(ms) if ms else float('nan'):.1f} |"
    )


def results(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every worker's results of one phase, together."""
    return [r for m in messages for r in m["results"]]


def lookup_rows(name: str, clients: list[dict[str, Any]]) -> tuple[str, int, int]:
    """A timing row for the lookups of ``clients``, how many came back empty and how many
    failed (``DiscoveryFailed``: no answer within the lookup's 10 s)."""
    lookups = [lk for c in clients for lk in c["lookups"]]
    found = [lk for lk in lookups if lk.get("found")]
    row = ms_row(name, [lk["secs"] for lk in lookups], len(found), len(lookups))
    empty = sum(1 for lk in lookups if "found" in lk and not lk["found"])
    return row, empty, sum(1 for lk in lookups if "error" in lk)


def mean_max(values: Sequence[int]) -> str:
    """``mean / max`` of connection counts."""
    return f"{statistics.fmean(values):.1f} / {max(values)}" if values else "-"


def report(run: Run) -> str:
    """The benchmark section's body."""
    ex = [h for w in run.executors_ready for h in w["hosts"]]
    up = [h for h in ex if "start" in h]
    announced = [h for h in up if h.get("ok")]
    errors = collections.Counter(h["error"].split(":")[0] for h in ex if "error" in h)
    rep = results(run.phases["reprovide"])
    rep_ok = sum(1 for h in rep if h.get("ok"))
    alone = results(run.phases["reprovide-alone"])
    executor_ids = [h["peer_id"] for h in up]
    id_set = set(executor_ids)
    clients = results(run.phases["go"])
    lookups = [lk for c in clients for lk in c["lookups"]]
    failed = [lk for lk in lookups if "error" in lk]
    sizes = [len(lk["found"]) for lk in lookups if "found" in lk]
    found_all = {p for lk in lookups for p in lk.get("found", [])}
    answers = [[lk.get("found", []) for lk in c["lookups"]] for c in clients]
    union_by_k = [
        len({p for ans in answers for a in ans[:k] for p in a})
        for k in range(1, LOOKUPS_PER_CLIENT + 1)
    ]
    n_clients = sum(1 for w in run.clients_ready for h in w["hosts"] if "start" in h)
    lookup_row, _, _ = lookup_rows("lookup (`find_providers`), all clients at once", clients)

    u = run.usage
    n_exec = max(1, len(up))
    per_k = 1000 / n_exec
    rss_a, cpu_a, wall_a = delta(u["start"], u["announced"])
    _, cpu_i, wall_i = delta(u["announced"], u["idle"])
    _, cpu_r, wall_r = delta(u["idle"], u["reprovided"])
    rss_c, cpu_c, _ = delta(u["alone"], u["clients"])
    rss_l, cpu_l, wall_l = delta(u["before_lookups"], u["looked_up"])

    def per_host(ws: list[dict[str, Any]]) -> tuple[float, float]:
        hosts = sum(1 for w in ws for h in w["hosts"] if "start" in h) or 1
        grow = sum(w["rss_after"] - w["rss_before"] for w in ws) / hosts
        return grow, sum(w["fds_after"] - w["fds_before"] for w in ws) / hosts

    e_rss, e_fds = per_host(run.executors_ready)
    c_rss, c_fds = per_host(run.clients_ready)
    base = statistics.fmean(w["rss_before"] for w in run.executors_ready)
    nofile = min(int(w["nofile"]) for w in run.executors_ready)
    e_wall = max(w["wall"] for w in run.executors_ready)
    e_cpu = sum(w["cpu"] for w in run.executors_ready)
    e_conns = [c for m in run.phases["reprovide"] for c in m["conns"]]
    c_conns = [c for m in run.phases["go"] for c in m["conns"]]
    load = os.getloadavg()

    timings = "\n".join(
        [
            ms_row(
                "executor host start (listen, dial 3 validators)",
                [h["start"] for h in up],
                len(up),
                len(ex),
            ),
            ms_row(
                "announce (`provide`, confirmed), first",
                [h["announce"] for h in up if "announce" in h],
                len(announced),
                len(up),
            ),
            ms_row(
                "re-provide, all executors up",
                [h["announce"] for h in rep if "announce" in h],
                rep_ok,
                len(rep),
            ),
            ms_row(
                f"re-provide, one executor {ALONE} times, nothing else running",
                [h["announce"] for h in alone if "announce" in h],
                sum(1 for h in alone if h.get("ok")),
                len(alone),
            ),
            lookup_row,
            lookup_rows(
                f"lookup, one client {ALONE} times, nothing else running",
                results(run.phases["go-alone"]),
            )[0],
        ]
    )
    validators = "\n".join(
        [
            f"| executors connect and announce | {wall_a:.1f} | {rss_a:.1f} | {cpu_a:.2f} "
            f"| {rss_a * per_k:.1f} MiB, {cpu_a * per_k:.1f} CPU s |",
            f"| idle, all executors connected | {wall_i:.1f} | | {cpu_i:.2f} "
            f"| {cpu_i / wall_i * 100 * per_k:.1f} % of a core |",
            f"| re-provide by every executor | {wall_r:.1f} | | {cpu_r:.2f} "
            f"| {cpu_r * per_k:.1f} CPU s ({cpu_r / n_exec * 1000:.2f} ms per announce) |",
            f"| {n_clients} clients connect | | {rss_c:.1f} | {cpu_c:.2f} | |",
            f"| {len(lookups)} lookups | {wall_l:.1f} | {rss_l:.1f} | {cpu_l:.2f} "
            f"| {cpu_l / max(1, len(lookups)) * 1000:.2f} ms CPU per lookup |",
        ]
    )
    spread_rows = "\n".join(s.row() for s in spreads(executor_ids, answers))
    median_size = statistics.median(sizes) if sizes else 0
    rss_start = " / ".join(f"{x:.0f}" for x in u["start"].rss)
    rss_end = " / ".join(f"{x:.0f}" for x in u["looked_up"].rss)
    fds_end = " / ".join(str(x) for x in u["looked_up"].fds)
    mode = (
        "**No workarounds** (`BENCH_SCALE_STOCK=1`): unmodified `lloom-validator`s, "
        "py-libp2p's lookup start and AutoConnector."
        if STOCK
        else "With the bench's workarounds (module docstring of `bench/scale.py`): validators "
        "are `lloom.validator.cli.main` with py-libp2p's connection caps (250 inbound) raised to "
        f"{VALIDATOR_MAX_CONNECTIONS:,}, lookups start from the routing table only, and the "
        "workers' hosts do not run py-libp2p's AutoConnector; what each changes is measured "
        "below the tables."
    )

    body = f"""
{len(run.executors_ready)} worker processes ran **{len(up)} of {EXECUTORS} executor hosts**
and {len(run.clients_ready)} ran **{n_clients} of {CLIENTS} client hosts**, each a full
py-libp2p host (`open_node`: TCP, Noise, Yamux, Kademlia client) bootstrapped to all
{VALIDATORS} validators (each bootstrapped to the ones started before it); all on 127.0.0.1
and the same 2 cores. {mode} Hosts start {START_CONCURRENCY} at a time per worker. An
executor announces one model key (`Dht.provide`, confirmed by asking a validator) as soon as
it is up, and once more when all are up (the re-provide executors do every 30 s); then every
client looks the key up {LOOKUPS_PER_CLIENT} times in a row, all clients at once. Network
part: {run.wall:.0f} s. Load average at the end: {load[0]:.1f} / {load[1]:.1f} /
{load[2]:.1f} (other work on the machine inflates latencies and CPU time).

| measurement | n | ok | p50 ms | p95 ms | max ms |
|---|---|---|---|---|---|
{timings}

- Executor host failures: {dict(errors) or "none"}; announcements not confirmed:
  {len(up) - len(announced)} of {len(up)} (re-provide: {len(rep) - rep_ok}). All executors
  were up and announced {e_wall:.0f} s after their workers started (workers' CPU:
  {e_cpu:.0f} s).
- Lookups: {len(failed)} failed, {sum(1 for s in sizes if s == 0)} empty; answer size
  min / median / max {min(sizes, default=0)} / {median_size:g} / {max(sizes, default=0)};
  all {len(lookups)} lookups took {wall_l:.1f} s. Together they found
  **{len(found_all & id_set)} of {len(up)} executors** ({len(found_all - id_set)} PeerIds
  that are not executors). Distinct executors found by every client's first k lookups
  together, k = 1..{LOOKUPS_PER_CLIENT}: {", ".join(str(x) for x in union_by_k)}.
- Cost of a host inside a worker process: **{e_rss:.2f} MiB RSS and {e_fds:.1f} file
  descriptors per executor host**, {c_rss:.2f} MiB and {c_fds:.1f} per client host, on top
  of {base:.0f} MiB for the worker process itself (RLIMIT_NOFILE raised to {nofile}).
  Connections per host (mean / max): executors {mean_max(e_conns)} after the re-provide,
  clients {mean_max(c_conns)} after their lookups.

Validators, mean of {VALIDATORS} (RSS from `/proc/<pid>/status`, CPU = utime + stime from
`/proc/<pid>/stat`); "per 1,000 executors" scales a phase by 1,000 / {len(up)}:

| phase | wall s | RSS growth MiB | CPU s | per 1,000 executors |
|---|---|---|---|---|
{validators}

Validator RSS {rss_start} MiB at the start, {rss_end} MiB at the end; open files at the
end {fds_end}.
"""
    if not STOCK:
        stock_clients = results(run.phases["go-stock"])
        stock_row, stock_empty, stock_failed = lookup_rows(
            f"lookup, py-libp2p's lookup start, {STOCK_LOOKUP_CLIENTS} clients per worker",
            stock_clients,
        )
        srep = results(run.phases["reprovide-stock"])
        dials = results(run.phases["dial"])
        dial_ok = sum(1 for d in dials if d.get("ok"))
        ps = run.peerstore or {}
        body += f"""
Without the workarounds, in the same run (after the measurements above):

| measurement | n | ok (non-empty / confirmed) | p50 ms | p95 ms | max ms |
|---|---|---|---|---|---|
{stock_row}
{
            ms_row(
                f"re-provide, py-libp2p's lookup start, {STOCK_REPROVIDES} per worker at once",
                [h["announce"] for h in srep if "announce" in h],
                sum(1 for h in srep if h.get("ok")),
                len(srep),
            )
        }

- Of {sum(len(c["lookups"]) for c in stock_clients)} lookups with py-libp2p's own lookup
  start, **{stock_empty} came back empty and {stock_failed} failed** (with the workaround:
  {sum(1 for s in sizes if s == 0)} and {len(failed)} of {len(lookups)}, under more load): a
  client that has seen providers before starts its lookup from them (DHT clients, which
  do not answer) and leaves a validator out whenever 20 known peers are closer to the key.
- An unmodified `lloom-validator` accepted **{dial_ok} of {len(dials)}** hosts that dialled it
  ({len(dials) - dial_ok} refused; it held {run.stock_validator_fds} open files afterwards).
- A node (`open_node`, unmodified) whose peerstore was given {ps["peers"]:,} peers
  {"kept" if ps["own_key_kept"] else "**lost its own public key**"}; when another node then
  connected, it {f"**stopped**: `{ps['stopped']}`" if ps["stopped"] else "kept running"}.
"""
    body += f"""
Request spreading, simulated (no network): {REQUESTS:,} requests arrive as a Poisson stream
at the given rate, each from a random one of the {len(clients)} clients, which picks its
executor with `lloom.client.spread.spread` (two random choices over its own outstanding
requests; ties go to the earlier in its list, here the order the DHT returned) among the
providers its lookups above returned; service time exponential, mean
{SERVICE_MEAN_SECS:g} s. Requests per executor, over all {len(up)} executors:

| what each client knows | rate /s | known per client (median) | min | median | max | CV \
| executors with none |
|---|---|---|---|---|---|---|---|
{spread_rows}
"""
    return body


def main() -> None:
    """Run the scale simulation and write its section."""
    configure_logging(0)
    raise_nofile()  # inherited by the validators
    with tempfile.TemporaryDirectory() as tmp:
        run = run_network(Path(tmp))
    body = report(run)
    write_section("Scale simulation", body)
    print(body)


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        worker_main(sys.argv[2:])
    elif sys.argv[1:2] == ["validator"]:
        validator_main(sys.argv[2:])
    else:
        main()
