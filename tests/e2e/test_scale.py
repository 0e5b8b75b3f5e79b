"""Many executors of one model: every one can announce itself, lookups find them all, load
spreads over them (less to a slow one), and a lookup that fails under load is never a 404."""

from __future__ import annotations

import collections
import os
import signal
import sqlite3
from pathlib import Path

import httpx
import pytest
import trio

from lloom.dhtkeys import model_key
from lloom.errors import DiscoveryFailed
from tests.e2e.test_failover import client_node
from tests.support.network import (
    start_executor,
    start_gateway,
    start_mock,
    start_validator,
    write_config,
)
from tests.support.procs import Proc, Processes, script

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

EXECUTORS = 30


def start_executors(procs: Processes, boot: str, url: str, count: int) -> list[Proc]:
    """Start ``count`` executors of ``mock-a`` at once (the caller waits for readiness)."""
    started = []
    for i in range(count):
        name = f"exec-{i}"
        config = write_config(
            procs.root / name / "config.toml", url, ["mock-a"], procs.root / name / "state"
        )
        argv = [script("lloom-executor"), "--bootstrap-nodes", boot, "--config", str(config)]
        started.append(procs.start(name, argv))
    return started


def stop_together(started: list[Proc]) -> None:
    """Stop executors all at once (the fixture would stop them one after another)."""
    for proc in started:
        assert proc.popen is not None
        proc.popen.send_signal(signal.SIGINT)
    for proc in started:
        assert proc.wait_exit(30) == 0


async def test_thirty_executors_of_one_model_all_announce_and_are_all_found(
    procs: Processes,
) -> None:
    _, url = start_mock(procs)
    _, v = start_validator(procs)
    boot = v.listen[0]
    started = start_executors(procs, boot, url, EXECUTORS)
    ready = {proc.wait_ready(timeout=240).peer_id for proc in started}
    assert len(ready) == EXECUTORS  # the 21st and later confirmed their announcements too

    found: set[str] = set()
    sizes: list[int] = []
    async with client_node(boot) as node:
        with trio.move_on_after(120):
            while not found >= ready:  # each answer is a fair sample of at most 20
                try:
                    answer = await node.dht.find_providers(model_key("mock-a"))
                except DiscoveryFailed:
                    answer = []
                sizes.append(len(answer))
                found |= {str(info.peer_id) for info in answer}
                await trio.sleep(0.1)
    assert found == ready, f"{len(ready - found)} executors never found; answer sizes {sizes}"
    assert max(sizes) <= 20
    stop_together(started)


def usage_count(state: Path) -> int:
    db = sqlite3.connect(state / "usage.sqlite3")
    try:
        return int(db.execute("SELECT COUNT(*) FROM usage").fetchone()[0])
    finally:
        db.close()


async def test_a_gateway_spreads_requests_over_twenty_executors(procs: Processes) -> None:
    _, url = start_mock(procs)
    _, v = start_validator(procs)
    boot = v.listen[0]
    started = start_executors(procs, boot, url, 20)
    for proc in started:
        proc.wait_ready(timeout=240)
    _, base = start_gateway(procs, boot)
    body = {"model": "mock-a", "messages": [{"role": "user", "content": "spread me"}]}
    async with httpx.AsyncClient(base_url=base, timeout=60) as http:
        limiter = trio.CapacityLimiter(16)
        failures: list[int] = []

        async def one() -> None:
            async with limiter:
                answer = await http.post("/chat/completions", json=body)
                if answer.status_code != 200:
                    failures.append(answer.status_code)

        with trio.fail_after(180):
            async with trio.open_nursery() as nursery:
                for _ in range(400):
                    nursery.start_soon(one)
    assert failures == []
    served = [usage_count(procs.root / f"exec-{i}" / "state") for i in range(20)]
    assert sum(served) == 400
    assert all(10 <= n <= 40 for n in served), f"requests per executor: {served}"  # fair: 20
    stop_together(started)


async def _post_many(base: str, count: int, concurrency: int) -> list[httpx.Response]:
    """``count`` chat requests to the gateway, ``concurrency`` at a time."""
    body = {"model": "mock-a", "messages": [{"role": "user", "content": "spread me"}]}
    answers: list[httpx.Response] = []
    async with httpx.AsyncClient(base_url=base, timeout=120) as http:
        limiter = trio.CapacityLimiter(concurrency)

        async def one() -> None:
            async with limiter:
                answers.append(await http.post("/chat/completions", json=body))

        with trio.fail_after(240):
            async with trio.open_nursery() as nursery:
                for _ in range(count):
                    nursery.start_soon(one)
    return answers


async def test_a_slow_executor_gets_less(procs: Processes) -> None:
    """One executor behind a slow backend among four fast ones: it holds its requests
    longer, so two random choices on outstanding requests send it fewer."""
    _, fast = start_mock(procs, "mock-fast")
    _, slow = start_mock(procs, "mock-slow", "--delay-ms", "400")
    _, v = start_validator(procs)
    boot = v.listen[0]
    started = start_executors(procs, boot, fast, 4)
    slow_proc, _, slow_state = start_executor(procs, "exec-slow", boot, slow, ["mock-a"])
    for proc in started:
        proc.wait_ready(timeout=120)
    _, base = start_gateway(procs, boot)
    answers = await _post_many(base, 250, 16)
    assert [a.status_code for a in answers if a.status_code != 200] == []
    served_fast = [usage_count(procs.root / f"exec-{i}" / "state") for i in range(4)]
    served_slow = usage_count(slow_state)
    assert sum(served_fast) + served_slow == 250
    assert served_slow < 250 / 5 and served_slow < min(served_fast), (served_slow, served_fast)
    stop_together([*started, slow_proc])


async def test_lookups_that_time_out_under_load_never_404(procs: Processes) -> None:
    """The validator freezes (SIGSTOP) while a busy executor turns requests away: lookups
    time out under load, and the gateway answers from the executors it knew, or 503 with
    Retry-After, never 404 (the bug: 118 of 552 requests got 404 with 64 streams)."""
    _, url = start_mock(procs, "mock", "--delay-ms", "50")
    validator, v = start_validator(procs)
    boot = v.listen[0]
    start_executor(
        procs, "exec", boot, url, ["mock-a"], extra="[limits]\nmax_concurrent_requests = 4"
    )
    _, base = start_gateway(procs, boot)
    assert [a.status_code for a in await _post_many(base, 1, 1)] == [200]
    os.kill(validator.pid, signal.SIGSTOP)
    try:
        answers = await _post_many(base, 200, 32)
    finally:
        os.kill(validator.pid, signal.SIGCONT)
    statuses = collections.Counter(a.status_code for a in answers)
    assert set(statuses) <= {200, 503}, statuses
    assert statuses[200] >= 50, statuses  # the executor it knew kept serving
    assert all(a.headers.get("retry-after") for a in answers if a.status_code == 503)
    assert [a.status_code for a in await _post_many(base, 20, 4)] == [200] * 20
