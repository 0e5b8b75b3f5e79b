"""Request-path benchmark: calling the backend directly vs through lloom vs through LiteLLM.

All against the same mock OpenAI backend (no delay), in one run, interleaved request by
request. lloom = the client library in this process -> executor process -> backend.
LiteLLM = its proxy (``litellm[proxy]``, installed by ``make bench`` into its own venv)
in front of the same backend; skipped with a note when it cannot be installed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import trio
from libp2p.peer.peerinfo import info_from_p2p_addr
from multiaddr import Multiaddr

from bench import procs
from bench.report import STATS_HEADER, Stats, write_section
from lloom.client.discovery import find_executors
from lloom.client.session import StreamPool, send_request
from lloom.identity import Identity
from lloom.logs import configure_logging
from lloom.node.node import Node, NodeConfig, open_node
from lloom.protocol import llm

#: ``LLOOM_BENCH_QUICK=1`` shrinks every count, to check that the benchmark runs.
QUICK = os.environ.get("LLOOM_BENCH_QUICK") == "1"
LATENCY_N = 20 if QUICK else 400
TTFT_N = 20 if QUICK else 200
THROUGHPUT_REQUESTS = {1: 20, 16: 64, 64: 128} if QUICK else {1: 300, 16: 1500, 64: 2500}
H2LOAD_REQUESTS = {1: 50, 16: 200, 64: 400} if QUICK else {1: 500, 16: 2000, 64: 4000}
DISCOVERY_N = 3 if QUICK else 20
#: A team gateway is one peer to its executors: their per-peer limits are raised to match.
EXECUTOR_LIMITS = (
    "[limits]\nmax_concurrent_requests = 256\nmax_requests_per_peer = 256\n"
    "max_streams_per_peer = 512\n"
)
COLD_CLI_N = 2 if QUICK else 8
LITELLM_VENV = procs.ROOT / "bench" / ".litellm-venv"
LITELLM_KEY = "sk-bench"

BODY = {"model": "mock-a", "messages": [{"role": "user", "content": "hello benchmark"}]}

Call = Callable[[], Awaitable[float]]


def http_call(client: httpx.AsyncClient, url: str, headers: dict[str, str]) -> Call:
    async def call() -> float:
        start = time.perf_counter()
        r = await client.post(url + "/chat/completions", json=BODY, headers=headers)
        r.raise_for_status()
        return time.perf_counter() - start

    return call


def http_ttft(client: httpx.AsyncClient, url: str, headers: dict[str, str]) -> Call:
    async def call() -> float:
        start = time.perf_counter()
        first = 0.0
        body = BODY | {"stream": True}
        async with client.stream(
            "POST", url + "/chat/completions", json=body, headers=headers
        ) as r:
            async for line in r.aiter_lines():
                if not first and '"content": "' in line.replace('":"', '": "') and "Echo" in line:
                    first = time.perf_counter() - start
        return first

    return call


def lloom_call(node: Node, target: Any, stream: bool, pool: StreamPool) -> Call:
    request = llm.Request(llm.RequestKind.CHAT, BODY | {"stream": stream})

    async def call() -> float:
        start = time.perf_counter()
        first = 0.0

        async def on_chunk(chunk: dict[str, Any]) -> None:
            nonlocal first
            if not first and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - start

        await send_request(node, target, request, on_chunk, pool=pool)
        return first if stream else time.perf_counter() - start

    return call


async def interleaved(calls: dict[str, Call], n: int) -> dict[str, list[float]]:
    """Run each call ``n`` times, rotating between them, after a warm-up."""
    for call in calls.values():
        for _ in range(20):
            await call()
    out: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(n):
        for name, call in calls.items():
            out[name].append(await call())
    return out


async def throughput(call: Call, concurrency: int, total: int) -> float:
    """Requests per second with ``concurrency`` callers sharing ``total`` requests."""
    remaining = total

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await call()

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    return total / (time.perf_counter() - start)


async def discovery(boot: str, n: int) -> list[float]:
    """Client host started -> executor for the model found and dialled."""
    times = []
    for _ in range(n):
        start = time.perf_counter()
        async with open_node(Identity.generate(), NodeConfig(bootstrap=[Multiaddr(boot)])) as node:
            found = await find_executors(node, "mock-a")
            await node.connect(found[0])
            times.append(time.perf_counter() - start)
    return times


def cold_cli(boot: str, tmp: Path, n: int) -> list[float]:
    """Process start -> answer printed -> exit, for ``lloom-client``."""
    times = []
    env = procs.env(tmp / "cli")
    for _ in range(n):
        start = time.perf_counter()
        subprocess.run(
            [
                str(procs.BIN / "lloom-client"),
                "--bootstrap-nodes",
                boot,
                "--model",
                "mock-a",
                "--prompt",
                "hi",
            ],
            check=True,
            capture_output=True,
            env=env,
        )
        times.append(time.perf_counter() - start)
    return times


def h2load(url: str, concurrency: int, total: int, headers: dict[str, str]) -> dict[str, float]:
    """Non-streaming requests/s of ``url`` under ``h2load --h1`` (HTTP/1.1, one request at a
    time per connection), with its succeeded and failed counts; empty without h2load."""
    exe = shutil.which("h2load")
    if exe is None:
        return {}
    with tempfile.NamedTemporaryFile("w", suffix=".json") as body:
        json.dump(BODY, body)
        body.flush()
        argv = [exe, "--h1", "-n", str(total), "-c", str(concurrency), "-m", "1"]
        argv += ["-H", "content-type: application/json", "-d", body.name]
        for name, value in headers.items():
            argv += ["-H", f"{name}: {value}"]
        out = subprocess.run(
            [*argv, url + "/chat/completions"], capture_output=True, text=True, check=True
        ).stdout
    rps = re.search(r"finished in [^,]+, ([0-9.]+) req/s", out)
    counts = re.search(r"(\d+) succeeded, (\d+) failed, (\d+) errored", out)
    if rps is None or counts is None:
        raise RuntimeError(f"unexpected h2load output: {out[-500:]}")
    ok, failed, errored = (int(g) for g in counts.groups())
    return {"rps": float(rps.group(1)), "ok": ok, "failed": failed + errored}


def start_litellm(tmp: Path, backend: str) -> tuple[subprocess.Popen[str] | None, str]:
    """LiteLLM's proxy in front of ``backend``, or (None, reason)."""
    exe = LITELLM_VENV / "bin" / "litellm"
    if not exe.exists():
        return None, "LiteLLM is not installed (make bench installs it into bench/.litellm-venv)"
    cfg = tmp / "litellm.yaml"
    cfg.write_text(
        "model_list:\n  - model_name: mock-a\n    litellm_params:\n"
        f"      model: openai/mock-a\n      api_base: {backend}\n      api_key: sk-none\n"
        f"general_settings:\n  master_key: {LITELLM_KEY}\n"
        "litellm_settings:\n  drop_params: true\n"
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_LOG="ERROR")
    with (tmp / "litellm.log").open("w") as log:
        proc = subprocess.Popen(
            [
                str(exe),
                "--config",
                str(cfg),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--num_workers",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
        )
    procs.wait_http(f"http://127.0.0.1:{port}/health/liveliness", timeout=180)
    return proc, f"http://127.0.0.1:{port}/v1"


async def measure(
    boot: str, target: Any, backend: str, litellm: str | None, gateway: str
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    async with open_node(Identity.generate(), NodeConfig(bootstrap=[Multiaddr(boot)])) as node:
        await node.connect(target)
        pool = StreamPool(node, max_idle_per_peer=128)
        limits = httpx.Limits(max_connections=128, max_keepalive_connections=128)
        async with httpx.AsyncClient(limits=limits, timeout=60) as client:
            auth = {"Authorization": f"Bearer {LITELLM_KEY}"}
            calls: dict[str, Call] = {
                "direct": http_call(client, backend, {}),
                "lloom": lloom_call(node, target, stream=False, pool=pool),
            }
            ttfts: dict[str, Call] = {
                "direct": http_ttft(client, backend, {}),
                "lloom": lloom_call(node, target, stream=True, pool=pool),
            }
            if litellm:
                calls["litellm"] = http_call(client, litellm, auth)
                ttfts["litellm"] = http_ttft(client, litellm, auth)
            latency_calls = calls | {"gateway": http_call(client, gateway, {})}
            ttfts["gateway"] = http_ttft(client, gateway, {})
            results["latency"] = await interleaved(latency_calls, LATENCY_N)
            results["ttft"] = await interleaved(ttfts, TTFT_N)
            rps: dict[str, dict[int, float]] = {}
            for name, call in calls.items():
                rps[name] = {}
                for conc, total in THROUGHPUT_REQUESTS.items():
                    rps[name][conc] = await throughput(call, conc, total)
            results["rps"] = rps
    results["discovery"] = await discovery(boot, DISCOVERY_N)
    return results


TARGETS = {"lloom": "≤ 2 ms p50, ≤ 3 ms TTFT", "gateway": "below LiteLLM"}


def added(samples: dict[str, list[float]], name: str, q: int) -> float:
    """Added ms at quantile ``q`` (50/90) of ``name`` over direct."""

    def quant(xs: list[float]) -> float:
        return statistics.quantiles([x * 1000 for x in xs], n=100, method="inclusive")[q - 1]

    return quant(samples[name]) - quant(samples["direct"])


def main() -> None:
    """Run the request-path benchmark and write its section."""
    configure_logging(0)
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        v_proc, v = procs.validator(tmp)
        m_proc, backend = procs.mock(tmp)
        e_proc, ex = procs.executor(tmp, v.listen[0], backend, ["mock-a"], EXECUTOR_LIMITS)
        lite_proc, lite = start_litellm(tmp, backend)
        g_proc, gateway_url = procs.gateway(tmp, v.listen[0])
        litellm = lite if lite_proc is not None else None
        try:
            time.sleep(2)  # let the executor settle before measuring its idle memory
            idle_rss = procs.rss_mb(e_proc.pid)
            target = info_from_p2p_addr(Multiaddr(ex.listen[0]))
            results = trio.run(measure, v.listen[0], target, backend, litellm, gateway_url)
            results["h2load"] = h2load_all(backend, litellm, gateway_url)
            cli = cold_cli(v.listen[0], tmp, COLD_CLI_N)
        finally:
            procs.stop(*(p for p in (g_proc, e_proc, m_proc, v_proc, lite_proc) if p is not None))
    body = render(results, cli, idle_rss, litellm is not None, lite)
    write_section("Request path", body)
    print(body)


def h2load_all(backend: str, litellm: str | None, gateway: str) -> dict[str, dict[int, Any]]:
    """``h2load`` at each concurrency against each HTTP path, paths interleaved."""
    urls: dict[str, tuple[str, dict[str, str]]] = {
        "direct": (backend, {}),
        "gateway": (gateway, {}),
    }
    if litellm is not None:
        urls["litellm"] = (litellm, {"authorization": f"Bearer {LITELLM_KEY}"})
    out: dict[str, dict[int, Any]] = {name: {} for name in urls}
    for conc, total in H2LOAD_REQUESTS.items():
        for name, (url, headers) in urls.items():
            out[name][conc] = h2load(url, conc, total, headers)
    return out


def render_h2load(h2: dict[str, dict[int, Any]]) -> str:
    """The h2load table, or why there is none."""
    if not any(h2.values()) or not all(h2[n][c] for n in h2 for c in h2[n]):
        return "h2load is not installed (`make bench` installs nghttp2-client): not measured."
    names = list(h2)
    head = "| concurrency | " + " | ".join(f"{n} req/s (failed)" for n in names)
    rows = [head + " | gateway / litellm |", "|---" * (len(names) + 2) + "|"]
    for conc in H2LOAD_REQUESTS:
        cells = [f"{h2[n][conc]['rps']:.0f} ({h2[n][conc]['failed']})" for n in names]
        ratio = (
            f"{h2['gateway'][conc]['rps'] / h2['litellm'][conc]['rps']:.1f}"
            if "litellm" in h2
            else "—"
        )
        rows.append(f"| {conc} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(rows)


def render(r: dict[str, Any], cli: list[float], rss: float, has_lite: bool, lite_note: str) -> str:
    lat, ttft, rps = r["latency"], r["ttft"], r["rps"]
    rows = [Stats.of(lat[name]).row(f"non-streaming request, {name}") for name in lat]
    rows += [Stats.of(ttft[name]).row(f"time to first token, {name}") for name in ttft]
    rows += [Stats.of(r["discovery"]).row("discovery: host start -> executor found and dialled")]
    rows += [Stats.of(cli).row("cold CLI: process start -> answer printed")]
    lines = [
        "| hop | added p50 ms | added p90 ms | added TTFT p50 ms | target |",
        "|---|---|---|---|---|",
    ]
    for name in [n for n in lat if n != "direct"]:
        lines.append(
            f"| {name} | {added(lat, name, 50):.2f} | {added(lat, name, 90):.2f} "
            f"| {added(ttft, name, 50):.2f} | {TARGETS.get(name, '')} |"
        )
    rps_rows = ["| concurrency | " + " | ".join(rps) + " |", "|---" * (len(rps) + 1) + "|"]
    for conc in THROUGHPUT_REQUESTS:
        rps_rows.append(f"| {conc} | " + " | ".join(f"{rps[n][conc]:.0f}" for n in rps) + " |")
    lite_line = "" if has_lite else f"\n**LiteLLM not measured:** {lite_note}\n"
    return f"""
Same mock backend (no delay) for every path, one run, requests interleaved path by path.
lloom = client library in the benchmark process -> executor process -> backend, on a warm
connection, reusing idle request streams as the gateway does. LiteLLM = its proxy
(1 worker) in front of the same backend. gateway = an HTTP client -> `lloom-client
gateway` -> executor -> backend (two hops: the HTTP one and the libp2p one). The
benchmark process, executor, backend, gateway and proxy share the machine's 2 cores.
{lite_line}
{STATS_HEADER}
{chr(10).join(rows)}

Added over calling the backend directly:

{chr(10).join(lines)}

Requests per second (non-streaming) by concurrency (target for lloom at 64: ≥ 300 and at least
LiteLLM's):

{chr(10).join(rps_rows)}

Requests per second through HTTP with `h2load --h1` (nghttp2; one request at a time per
connection, {", ".join(f"{t} requests at {c}" for c, t in H2LOAD_REQUESTS.items())}), every
HTTP path in turn at each concurrency (target for the gateway at 64: at least 5 times
LiteLLM's, zero failed):

{render_h2load(r["h2load"])}

Executor idle RSS: {rss:.0f} MiB (target ≤ 120 MB).
"""


if __name__ == "__main__":
    main()
