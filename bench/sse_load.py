"""A closed-loop load client for OpenAI-compatible streaming endpoints (aiohttp).

``python -m bench.sse_load JSON`` where JSON is ``{"url": …/v1, "concurrency": N, "warm":
S, "secs": S, "body": {...}, "headers": {...}}``: ``concurrency`` callers each stream chat
completions back to back, the first ones staggered over ``warm`` seconds; after ``warm``
seconds a window of ``secs`` seconds opens. It prints one line ``window t0 t1`` (the
window, ``time.monotonic()``, so the caller can read CPU counters of other processes at the
same moments: it reads them when it sees the line ``open`` and the line ``closed``), then
one JSON line of results:

- ``chunks``: content chunks (a choice with non-empty ``delta.content`` or ``text``)
  received inside the window;
- ``answers``, ``total``, ``first``: answers started and finished inside the window, with
  their durations and times to first content chunk (seconds);
- ``errors``: failed answers by kind (HTTP status, an error event in the stream, a
  transport failure), with one example each; ``cpu``: this process's CPU seconds in the
  window.

A Python load client costs CPU too; aiohttp parses ~13k responses/s on one core here
(docs/benchmarks.md), well above these loads, and every path pays the same.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp


@dataclass
class Tally:
    """What one load process counted in its window (shared with the library worker of
    :mod:`bench.stream`)."""

    chunks: int = 0
    totals: list[float] = field(default_factory=list)
    firsts: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)

    def failed(self, kind: str, text: str) -> None:
        """Count one failed answer of ``kind``, keeping its first message."""
        self.errors[kind] += 1
        self.examples.setdefault(kind, text[:300])

    def answered(self, total: float, first: float) -> None:
        """One answer started and finished inside the window."""
        self.totals.append(total)
        self.firsts.append(first)

    def result(self, secs: float, cpu: float) -> dict[str, Any]:
        """The results line (see the module docstring)."""
        return {
            "secs": secs,
            "chunks": self.chunks,
            "answers": len(self.totals),
            "total": self.totals,
            "first": self.firsts,
            "errors": dict(self.errors),
            "examples": self.examples,
            "cpu": cpu,
        }


def _content(line: bytes) -> tuple[bool, str | None]:
    """(whether this SSE line is a content chunk, an error text when it is an error)."""
    if not line.startswith(b"data:"):
        return False, None
    data = line[5:].strip()
    if data == b"[DONE]":
        return False, None
    try:
        obj = json.loads(data)
    except ValueError:
        return False, "unparsable event"
    if not isinstance(obj, dict):
        return False, "non-object event"
    if "error" in obj and "choices" not in obj:
        return False, str(obj["error"])[:200]
    for choice in obj.get("choices") or []:
        delta = choice.get("delta") or {}
        if delta.get("content") or choice.get("text"):
            return True, None
    return False, None


async def run(args: dict[str, Any]) -> dict[str, Any]:
    """The load of ``args``; returns the results (see the module docstring)."""
    url = args["url"].rstrip("/") + "/chat/completions"
    body = args["body"] | {"stream": True}
    headers = args.get("headers") or {}
    warm, secs = float(args["warm"]), float(args["secs"])
    state = {"t0": float("inf"), "t1": float("inf"), "closed": False}
    tally = Tally()
    failed = tally.failed

    async def one(session: aiohttp.ClientSession) -> None:
        start = time.monotonic()
        first = 0.0
        async with session.post(url, json=body, headers=headers) as response:
            if response.status != 200:
                failed(f"HTTP {response.status}", await response.text())
                await asyncio.sleep(0.05)
                return
            async for line in response.content:
                is_chunk, error = _content(line)
                if error is not None:
                    failed("error event", error)
                    return
                if is_chunk:
                    now = time.monotonic()
                    if not first:
                        first = now - start
                    if state["t0"] <= now <= state["t1"]:
                        tally.chunks += 1
        end = time.monotonic()
        if start >= state["t0"] and end <= state["t1"]:
            tally.answered(end - start, first)

    async def caller(session: aiohttp.ClientSession) -> None:
        await asyncio.sleep(random.uniform(0, warm / 2))
        while not state["closed"]:
            try:
                await one(session)
            except (TimeoutError, aiohttp.ClientError) as exc:
                failed(type(exc).__name__, str(exc))
                await asyncio.sleep(0.05)

    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = [asyncio.create_task(caller(session)) for _ in range(args["concurrency"])]
        await asyncio.sleep(warm)
        print("open", flush=True)
        state["t0"] = time.monotonic()
        cpu0 = time.process_time()
        await asyncio.sleep(secs)
        state["t1"] = time.monotonic()
        cpu = time.process_time() - cpu0
        print("closed", flush=True)
        state["closed"] = True
        await asyncio.wait(tasks, timeout=30)
        for task in tasks:
            task.cancel()
    return tally.result(state["t1"] - state["t0"], cpu)


def main() -> None:
    """Run the load given as JSON on the command line; print the results as JSON."""
    result = asyncio.run(run(json.loads(sys.argv[1])))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
