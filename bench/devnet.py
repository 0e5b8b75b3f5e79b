"""Real-model benchmark: ``lloom devnet`` start-up, and SmolLM2 through the network.

Starts ``lloom devnet`` (the embedded SmolLM2-135M-Instruct on llama.cpp) twice on the
same data dir: a first start (deploys the contract) and a second one (reuses it). Then
streams the same prompts, interleaved, to the model server directly and through the
gateway, and reports time to first token, time to the last token and completion tokens/s
(tokens as counted by the executor's tiktoken, the same for both paths), so what the
network adds on a real model is read next to what the model itself costs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench import procs
from bench.report import STATS_HEADER, Stats, write_section
from lloom.tokens import count_text

QUICK = os.environ.get("LLOOM_BENCH_QUICK") == "1"
N = 4 if QUICK else 12
MAX_TOKENS = 48
MODEL_PYTHON = procs.ROOT / ".venv-model" / "bin" / "python"
PROMPTS = [
    "Name three rivers.",
    "What is a cat?",
    "Give one tip for sleeping well.",
    "Say something about the sea.",
]


def start_devnet(
    data_dir: Path, log: Path, threads: int | None = None
) -> tuple[subprocess.Popen[str], float]:
    """Start ``lloom devnet``; return it and the seconds until it said it is ready."""
    extra = [] if threads is None else ["--model-threads", str(threads)]
    started = time.perf_counter()
    proc = procs.start(
        [
            str(procs.BIN / "lloom"),
            "devnet",
            "--data-dir",
            str(data_dir),
            "--model-python",
            str(MODEL_PYTHON),
            "--rpc-port",
            "0",
            "--p2p-port",
            "0",
            "--gateway-port",
            "0",
            *extra,
        ],
        procs.env(data_dir.parent / "home"),
        log,
    )
    procs.wait_line(proc, "devnet ready ")
    return proc, time.perf_counter() - started


def stop_devnet(proc: subprocess.Popen[str]) -> None:
    """SIGINT (what Ctrl-C sends) and wait: the devnet stops its children itself."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def stream(client: httpx.Client, base: str, prompt: str) -> tuple[float, float, str]:
    """One streamed chat completion: (seconds to first token, to the end, the text)."""
    body = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": True,
    }
    start = time.perf_counter()
    first = 0.0
    parts: list[str] = []
    with client.stream("POST", base + "/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk: dict[str, Any] = json.loads(line.removeprefix("data: "))
            for choice in chunk.get("choices") or []:
                text = (choice.get("delta") or {}).get("content") or ""
                if text and not first:
                    first = time.perf_counter() - start
                parts.append(text)
    return first, time.perf_counter() - start, "".join(parts)


def measure(running: dict[str, Any]) -> tuple[list[str], str]:
    """Stream the prompts to the model server and through the gateway: table rows, rates."""
    paths = {"model server": running["backend_url"], "gateway": running["gateway_url"]}
    ttft: dict[str, list[float]] = {name: [] for name in paths}
    total: dict[str, list[float]] = {name: [] for name in paths}
    tokens: dict[str, int] = dict.fromkeys(paths, 0)
    with httpx.Client(timeout=120) as client:
        for base in paths.values():  # warm-up, not counted
            stream(client, base, "Hello")
        for i in range(N):
            # Alternate which path goes first, and make every prompt differ from its first
            # word: llama.cpp reuses the evaluated prefix of the previous prompt, which
            # would favour whichever path asks second.
            order = list(paths.items()) if i % 2 == 0 else list(paths.items())[::-1]
            for name, base in order:
                prompt = f"{i}{name[0]}. {PROMPTS[i % len(PROMPTS)]}"
                first, end, text = stream(client, base, prompt)
                ttft[name].append(first)
                total[name].append(end)
                tokens[name] += count_text(text)
    rows = []
    for name in paths:
        rows.append(Stats.of(ttft[name]).row(f"{name}: time to first token"))
        rows.append(Stats.of(total[name]).row(f"{name}: time to last token"))
    rates = ", ".join(f"{name} {tokens[name] / sum(total[name]):.0f}" for name in paths)
    return rows, rates


def main() -> None:
    """Run the real-model benchmark and write its section."""
    if not MODEL_PYTHON.exists():
        raise SystemExit(f"{MODEL_PYTHON} missing: run make model (make bench does)")
    cores = os.cpu_count() or 1
    runs: dict[int, tuple[list[str], str]] = {}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        data_dir = tmp / "devnet"
        proc, first_start = start_devnet(data_dir, tmp / "devnet-1.log")
        stop_devnet(proc)
        restarts: list[float] = []  # later starts reuse keys, chain and contract
        for threads in dict.fromkeys((cores, max(1, cores - 1))):
            proc, started = start_devnet(data_dir, tmp / f"devnet-{threads}.log", threads)
            restarts.append(started)
            try:
                running = json.loads((data_dir / "devnet.json").read_text())["running"]
                runs[threads] = measure(running)
            finally:
                stop_devnet(proc)
    sections = []
    for threads, (rows, rates) in runs.items():
        sections.append(
            f"Model server on {threads} of {cores} cores "
            f"(`--model-threads {threads}`):\n\n{STATS_HEADER}\n"
            + "\n".join(rows)
            + f"\n\nCompletion tokens per second of streaming (tiktoken count): {rates}.\n"
        )
    body = f"""
SmolLM2-135M-Instruct (Q4_1) on llama-cpp-python's server, started by `lloom devnet`; {N}
streamed chat completions per path (max_tokens {MAX_TOKENS}, temperature 0), interleaved
with the order alternating and no two prompts sharing a first word (llama.cpp reuses the
previous prompt's prefix), after one warm-up each. "gateway" is the whole lloom path:
gateway → libp2p stream → executor → the same model server.

`lloom devnet` start to its ready line: {first_start:.1f} s on a new data dir (deploys the
contract), {min(restarts):.1f} to {max(restarts):.1f} s on later starts (reuse keys, chain and
contract).

{chr(10).join(sections)}
With the model on every core, the gateway and executor processes that relay each chunk
compete with it for CPU; leaving them a core shows how much of the gap that is.
"""
    write_section("Real model (devnet)", body)
    print(body)
