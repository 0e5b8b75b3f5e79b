"""Streaming capacity: many answers streaming at once, direct, through lloom, through LiteLLM.

One mock backend (:mod:`tests.support.mock_openai`) sends one word every 20 ms
(``--chunk-delay-ms``; 48 content chunks an answer, 960 ms ideal), as a batched inference
server does for each of its parallel slots. For each path, ``concurrency`` callers stream
answers back to back (closed loop); after a warm-up a window of ``secs`` seconds is
measured: content chunks delivered in it, answers started and finished in it (time per
answer, time to first token), errors, and the CPU seconds each process spent in it
(``/proc/<pid>/stat``), per 1,000 chunks delivered.

Paths, in one run against the same backend, one after another:

- **direct**: the load client -> the backend;
- **library**: a worker process using lloom's client library (``NetworkClient``, what the
  gateway uses) -> executor -> backend;
- **gateway**: the load client -> ``lloom-client gateway`` -> executor -> backend;
- **litellm**: the load client -> LiteLLM's proxy (1 worker) -> backend (when installed).

The load client for the HTTP paths is :mod:`bench.sse_load` (aiohttp) in its own process.
Then the offered load is raised (``SATURATION`` callers) until the relay saturates.
``LLOOM_BENCH_QUICK=1`` shrinks everything, to check that the benchmark runs.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio
from multiaddr import Multiaddr

from bench import procs
from bench.nat import cpu_secs
from bench.report import write_section
from bench.request_path import LITELLM_KEY, start_litellm
from bench.sse_load import Tally
from lloom.client.network import NetworkClient
from lloom.identity import Identity
from lloom.node.node import NodeConfig, open_node
from lloom.protocol import llm

QUICK = os.environ.get("LLOOM_BENCH_QUICK") == "1"
TOKEN_MS = 20
WORDS = 47  # "Echo:" and 47 words: 48 content chunks an answer
PROMPT = " ".join(f"w{i}" for i in range(WORDS))
BODY: dict[str, Any] = {"model": "mock-a", "messages": [{"role": "user", "content": PROMPT}]}
CONCURRENCY = 8 if QUICK else 64
WARM = 2.0 if QUICK else 4.0
SECS = 3.0 if QUICK else 15.0
SATURATION = [16] if QUICK else [128, 192, 256]
EXECUTOR_LIMITS = (
    "[limits]\nmax_concurrent_requests = 1024\nmax_requests_per_peer = 1024\n"
    "max_streams_per_peer = 2048\n"
)


def load_http(url: str, concurrency: int, pids: dict[str, int], headers: dict[str, str]) -> Any:
    """Run :mod:`bench.sse_load` against ``url``; CPU of ``pids`` over its window."""
    args = {
        "url": url,
        "concurrency": concurrency,
        "warm": WARM,
        "secs": SECS,
        "body": BODY,
        "headers": headers,
    }
    argv = [sys.executable, "-m", "bench.sse_load", json.dumps(args)]
    return _windowed(argv, pids)


def load_library(boot: str, concurrency: int, pids: dict[str, int]) -> Any:
    """Run the client-library worker (``python -m bench.stream worker``)."""
    args = {"boot": boot, "concurrency": concurrency, "warm": WARM, "secs": SECS}
    argv = [sys.executable, "-m", "bench.stream", "worker", json.dumps(args)]
    return _windowed(argv, pids)


def _windowed(argv: list[str], pids: dict[str, int]) -> dict[str, Any]:
    """Run a load process; read the CPU of ``pids`` when it says its window opened and
    closed; return its results with ``cpu`` per process (the load process's own too)."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=procs.ROOT)
    assert proc.stdout is not None
    before: dict[str, float] = {}
    after: dict[str, float] = {}
    result: dict[str, Any] | None = None
    for line in proc.stdout:
        if line.strip() == "open":
            before = {name: cpu_secs(pid) for name, pid in pids.items()}
        elif line.strip() == "closed":
            after = {name: cpu_secs(pid) for name, pid in pids.items()}
        elif line.startswith("{"):
            result = json.loads(line)
    if proc.wait() != 0 or result is None:
        raise RuntimeError(f"load process {argv[2]} failed (exit {proc.returncode})")
    result["cpu_procs"] = {name: after[name] - before[name] for name in pids}
    return result


# --- the client-library worker ----------------------------------------------------------


async def worker(args: dict[str, Any]) -> dict[str, Any]:
    """The library path's load: like :mod:`bench.sse_load`, with ``NetworkClient``."""
    request = llm.Request(llm.RequestKind.CHAT, BODY | {"stream": True})
    warm, secs = float(args["warm"]), float(args["secs"])
    window = {"t0": float("inf"), "t1": float("inf")}
    closed = False
    tally = Tally()
    config = NodeConfig(bootstrap=[Multiaddr(args["boot"])])
    async with open_node(Identity.generate(), config) as node, trio.open_nursery() as nursery:
        client = NetworkClient(node, None)
        client.nursery = nursery

        async def one() -> None:
            start = time.monotonic()
            first = 0.0

            async def on_chunk(chunk: dict[str, Any]) -> None:
                nonlocal first
                choices = chunk.get("choices") or []
                if choices and (choices[0].get("delta") or {}).get("content"):
                    now = time.monotonic()
                    if not first:
                        first = now - start
                    if window["t0"] <= now <= window["t1"]:
                        tally.chunks += 1

            await client.run(request, on_chunk)
            end = time.monotonic()
            if start >= window["t0"] and end <= window["t1"]:
                tally.answered(end - start, first)

        async def caller() -> None:
            await trio.sleep(random.uniform(0, warm / 2))
            while not closed:
                try:
                    await one()
                except Exception as exc:  # counted, as the HTTP load client counts its own
                    tally.failed(type(exc).__name__, str(exc))
                    await trio.sleep(0.05)

        async with trio.open_nursery() as callers:
            for _ in range(args["concurrency"]):
                callers.start_soon(caller)
            await trio.sleep(warm)
            print("open", flush=True)
            window["t0"] = time.monotonic()
            cpu0 = time.process_time()
            await trio.sleep(secs)
            window["t1"] = time.monotonic()
            cpu = time.process_time() - cpu0
            print("closed", flush=True)
            closed = True
        await client.pool.close()
        nursery.cancel_scope.cancel()
    return tally.result(window["t1"] - window["t0"], cpu)


# --- the run ------------------------------------------------------------------------------


#: How the backend paces words: a timer per stream, or shared steps (a batched server).
MODES = {"timer": "--chunk-delay-ms", "batched": "--batch-step-ms"}


def measure(mode: str = "timer", saturation: list[int] | None = None) -> dict[str, Any]:
    """Every path at ``CONCURRENCY``, then the saturation levels."""
    results: dict[str, Any] = {"levels": {}, "mode": mode}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        v_proc, v = procs.validator(tmp)
        m_proc, backend = procs.mock(tmp, MODES[mode], str(TOKEN_MS))
        e_proc, _ex = procs.executor(tmp, v.listen[0], backend, ["mock-a"], EXECUTOR_LIMITS)
        g_proc, gateway = procs.gateway(tmp, v.listen[0])
        lite_proc, lite = start_litellm(tmp, backend)
        started = [p for p in (g_proc, e_proc, m_proc, v_proc, lite_proc) if p is not None]
        try:
            base = {"backend": m_proc.pid}
            relay = base | {"executor": e_proc.pid, "validator": v_proc.pid}
            auth = {"Authorization": f"Bearer {LITELLM_KEY}"}
            paths: dict[str, Any] = {
                "direct": lambda c: load_http(backend, c, base, {}),
                "library": lambda c: load_library(v.listen[0], c, relay),
                "gateway": lambda c: load_http(gateway, c, relay | {"gateway": g_proc.pid}, {}),
            }
            if lite_proc is not None:
                paths["litellm"] = lambda c: load_http(
                    lite, c, base | {"litellm": lite_proc.pid}, auth
                )
            else:
                results["litellm_note"] = lite
            for name, run in paths.items():
                results[name] = run(CONCURRENCY)
                print(name, summary(results[name]), flush=True)
            for level in SATURATION if saturation is None else saturation:
                results["levels"][level] = {
                    name: paths[name](level)
                    for name in ("direct", "gateway", "litellm")
                    if name in paths
                }
                for name, r in results["levels"][level].items():
                    print(level, name, summary(r), flush=True)
        finally:
            procs.stop(*started)
    return results


def summary(r: dict[str, Any]) -> dict[str, float]:
    """The figures of one load run."""
    chunks = r["chunks"]
    per_k = {
        name: 1000 * cpu / chunks if chunks else float("nan")
        for name, cpu in (r["cpu_procs"] | {"load": r["cpu"]}).items()
    }
    return {
        "chunks_s": chunks / r["secs"],
        "answer_ms": 1000 * statistics.fmean(r["total"]) if r["total"] else float("nan"),
        "ttft_ms": 1000 * statistics.fmean(r["first"]) if r["first"] else float("nan"),
        "ttft_p50_ms": 1000 * statistics.median(r["first"]) if r["first"] else float("nan"),
        "answers": r["answers"],
        "errors": sum(r["errors"].values()),
        **{f"cpu_per_k_{k}": v for k, v in per_k.items()},
    }


def main() -> None:
    """Run the streaming-capacity benchmark (batched backend with the saturation levels,
    then the timer backend at ``CONCURRENCY``) and write its section."""
    batched = measure("batched")
    timer = measure("timer", [])
    body = render(batched) + "\n" + render_table(timer, TIMER_TITLE)
    write_section("Streaming capacity", body)
    print(body)


TIMER_TITLE = (
    "The same with a timer per stream instead of shared steps (each answer's words 20 ms "
    "apart, streams drifting apart; the issue's original measurement):"
)


def _errors(r: dict[str, Any]) -> str:
    total = sum(r["errors"].values())
    answers = r["answers"] + total
    if not total:
        return "0"
    kinds = ", ".join(f"{k}: {n}" for k, n in sorted(r["errors"].items()))
    return f"{total} ({100 * total / max(1, answers):.0f} %: {kinds})"


def _cpu(r: dict[str, Any], names: tuple[str, ...]) -> str:
    s = summary(r)
    parts = [f"{n} {s[f'cpu_per_k_{n}']:.3f}" for n in names if f"cpu_per_k_{n}" in s]
    return ", ".join(parts) or "—"


LLOOM_PROCS = ("executor", "gateway", "load", "validator")


def render_table(r: dict[str, Any], title: str = "") -> str:
    """The paths at ``CONCURRENCY`` as a table (with ``title`` above it)."""
    direct = summary(r["direct"])
    rows = [
        "| path | chunks/s delivered | vs direct | time per answer ms (ideal "
        f"{(WORDS + 1) * TOKEN_MS}) | vs direct | mean TTFT ms | added TTFT p50 ms | errors "
        "| CPU s per 1,000 chunks |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ("direct", "library", "gateway", "litellm"):
        if name not in r:
            continue
        s = summary(r[name])
        procs_shown = {
            "direct": ("backend",),
            "library": ("executor", "load"),
            "gateway": ("executor", "gateway"),
            "litellm": ("litellm",),
        }[name]
        rows.append(
            f"| {name} | {s['chunks_s']:.0f} | {s['chunks_s'] / direct['chunks_s']:.3f} "
            f"| {s['answer_ms']:.0f} | {s['answer_ms'] / direct['answer_ms']:.3f} "
            f"| {s['ttft_ms']:.1f} | {s['ttft_p50_ms'] - direct['ttft_p50_ms']:.1f} "
            f"| {_errors(r[name])} | {_cpu(r[name], procs_shown)} |"
        )
    return (title + "\n\n" if title else "") + "\n".join(rows) + "\n"


def render(r: dict[str, Any]) -> str:
    """The section: the batched run's table and its saturation levels."""
    sat = [
        "| callers | path | chunks/s delivered | time per answer ms | errors "
        "| CPU s/s of the relay processes | chunks/s per core |",
        "|---|---|---|---|---|---|---|",
    ]
    for level, by_path in r["levels"].items():
        for name, res in by_path.items():
            s = summary(res)
            used = {
                "direct": ("backend",),
                "gateway": ("executor", "gateway"),
                "litellm": ("litellm",),
            }[name]
            cpu = {n: res["cpu_procs"][n] / res["secs"] for n in used if n in res["cpu_procs"]}
            busiest = max(cpu.values()) if cpu else float("nan")
            per_core = s["chunks_s"] / busiest if busiest else float("nan")
            cpu_text = ", ".join(f"{n} {v:.2f}" for n, v in cpu.items())
            sat.append(
                f"| {level} | {name} | {s['chunks_s']:.0f} | {s['answer_ms']:.0f} "
                f"| {_errors(res)} | {cpu_text} | {per_core:.0f} |"
            )
    note = f"\n**LiteLLM not measured:** {r['litellm_note']}\n" if "litellm_note" in r else ""
    return f"""
One mock backend sending one word every {TOKEN_MS} ms ({WORDS + 1} content chunks an
answer) on a shared clock, as a batched inference server emits one token for every running
sequence at each decoding step (`--batch-step-ms`); {CONCURRENCY} answers streaming at once
(closed loop); a {SECS:g} s window after a {WARM:g} s warm-up; paths one after another in
one run. direct = load client -> backend; library = lloom's client library
(`NetworkClient`, in its own process) -> executor -> backend; gateway = load client ->
`lloom-client gateway` -> executor -> backend; litellm = load client -> LiteLLM proxy
(1 worker) -> backend. The HTTP load client is `bench/sse_load.py` (aiohttp, own process).
Every process shares the machine's 2 cores. CPU is each process's user + system time in
the window, per 1,000 content chunks delivered (`load` = the library worker, i.e. the
client library's own cost).
{note}
{render_table(r)}

Saturation: more callers at the same {TOKEN_MS} ms per word, until delivery stops keeping
up. "chunks/s per core" = delivered chunks/s divided by the CPU s/s of the busiest relay
process of that path (for direct: the backend itself).

{chr(10).join(sat)}
"""


def worker_main(argv: list[str]) -> None:
    """``python -m bench.stream worker JSON``."""
    result = trio.run(worker, json.loads(argv[0]))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker_main(sys.argv[2:])
    else:
        main()
