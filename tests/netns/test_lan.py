"""Scenario 6, LAN discovery by mDNS: executors and clients on one bridge find each other
without any validator, and a client that has validators too uses both sources."""

from __future__ import annotations

import json
import sys
import time

import pytest

from tests.netns.nodes import launch_executor, run_client, start_mock, start_validator
from tests.support.netns import Host, Topology, netns_argv
from tests.support.procs import Processes, script

pytestmark = pytest.mark.timeout(120)

MODEL = "mock-a"


def models_listing(procs: Processes, host: Host, base: str) -> dict[str, object]:
    """``GET /v1/models`` of a gateway listening inside ``host``."""
    code = f"import httpx; print(httpx.get('{base}/models', timeout=10).text)"
    done = procs.run("models", netns_argv(host, [sys.executable, "-c", code]), timeout=30)
    assert done.returncode == 0, done.stderr
    doc: dict[str, object] = json.loads(done.stdout)
    return doc


def test_mdns_alone_answers_without_any_validator(net: Topology, procs: Processes) -> None:
    started = time.monotonic()
    lan = net.subnet("lan")
    ehost, chost = net.host("exec", lan), net.host("client", lan)
    _, url = start_mock(procs, ehost)
    executor, _ = launch_executor(procs, ehost, "exec", "", url, [MODEL], "--mdns")
    ready = executor.wait_ready()
    assert ready.get("path") == "direct"
    up = time.monotonic()
    done = run_client(procs, chost, "", MODEL, "hi", "--mdns", "--json")
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["text"] == "Echo: hi"
    assert answer["executor"] == ready.peer_id
    assert answer["path"] == "direct"
    # A model nobody on the LAN serves: the "no executor" error (exit 3), quickly.
    start = time.monotonic()
    missing = run_client(procs, chost, "", "other-model", "hi", "--mdns")
    assert missing.returncode == 3, missing.stderr
    assert "no executor on the LAN serves model 'other-model'" in missing.stderr
    print(
        f"executor up in {up - started:.1f} s; answered in {time.monotonic() - up:.1f} s; "
        f"unknown model refused in {time.monotonic() - start:.1f} s"
    )


def test_mdns_peers_are_combined_with_the_dht(net: Topology, procs: Processes) -> None:
    lan = net.subnet("lan")
    vhost, lan_host, dht_host, chost = (
        net.host("validator", lan),
        net.host("lanexec", lan),
        net.host("dhtexec", lan),
        net.host("client", lan),
    )
    _, vready = start_validator(procs, vhost)
    boot = next(a for a in vready.listen if f"/{vhost.ip}/" in a)
    _, url1 = start_mock(procs, lan_host, "mock1")
    lan_only, _ = launch_executor(procs, lan_host, "lanexec", "", url1, [MODEL], "--mdns")
    _, url2 = start_mock(procs, dht_host, "mock2")
    dht_only, _ = launch_executor(procs, dht_host, "dhtexec", boot, url2, [MODEL])
    lan_ready, dht_ready = lan_only.wait_ready(), dht_only.wait_ready()

    argv = [
        script("lloom-client"),
        "gateway",
        "--listen",
        "127.0.0.1:0",
        "--bootstrap-nodes",
        boot,
        "--mdns",
    ]
    gateway = procs.start("gateway", netns_argv(chost, argv))
    base = f"http://{gateway.wait_ready().get('http')}/v1"
    deadline = time.monotonic() + 30
    while True:
        listing = models_listing(procs, chost, base)
        data = listing["data"]
        assert isinstance(data, list)
        counts = {m["id"]: m["executors"] for m in data}
        if counts.get(MODEL) == 2:
            break
        assert time.monotonic() < deadline, f"both executors not listed: {listing}"
    # One request per executor shows both are usable.
    used = set()
    for i in range(12):
        done = run_client(procs, chost, boot, MODEL, f"hi {i}", "--mdns", "--json")
        assert done.returncode == 0, done.stderr
        used.add(json.loads(done.stdout)["executor"])
        if used == {lan_ready.peer_id, dht_ready.peer_id}:
            break
    assert used == {lan_ready.peer_id, dht_ready.peer_id}
