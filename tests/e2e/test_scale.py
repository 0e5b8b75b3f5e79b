"""Many executors of one model: every one can announce itself, and lookups find them all."""

from __future__ import annotations

import signal
import sqlite3
from pathlib import Path

import httpx
import pytest
import trio

from lloom.dhtkeys import model_key
from tests.e2e.test_failover import client_node
from tests.support.network import start_gateway, start_mock, start_validator, write_config
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
    sizes = []
    async with client_node(boot) as node:
        with trio.fail_after(120):
            for _ in range(40):  # each answer is a fair sample of at most 20
                answer = await node.dht.find_providers(model_key("mock-a"))
                sizes.append(len(answer))
                found |= {str(info.peer_id) for info in answer}
                if found >= ready:
                    break
    assert found == ready, f"{len(ready - found)} executors never found"
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
    assert all(10 <= n <= 40 for n in served), served  # half to twice the fair 20
    stop_together(started)
