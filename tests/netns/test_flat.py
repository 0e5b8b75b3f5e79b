"""Scenario 1, one flat subnet: a validator, two executors and a client on four hosts.

Every node listens on ``/ip4/0.0.0.0/tcp/0``; the executors' backends (the mock) run on
their own host's 127.0.0.1. What the executors advertise, in their ready lines and in the
provider records a client finds, must be dialable from another host: the subnet IP,
never 0.0.0.0 or 127.0.0.1.
"""

from __future__ import annotations

import collections
import time

import pytest

from tests.netns.nodes import (
    address_on,
    client_json,
    find_providers,
    ip_of,
    start_executor,
    start_mock,
    start_validator,
)
from tests.support.netns import Topology
from tests.support.procs import Processes

pytestmark = pytest.mark.timeout(180)

MODEL = "mock-a"


def test_flat_subnet_answers_and_advertises_subnet_addresses(
    net: Topology, procs: Processes
) -> None:
    started = time.monotonic()
    lan = net.subnet("lan")
    vhost = net.host("validator", lan)
    ehosts = [net.host("exec1", lan), net.host("exec2", lan)]
    chost = net.host("client", lan)

    _, vready = start_validator(procs, vhost)
    assert all(ip_of(a) == vhost.ip for a in vready.listen), vready.listen
    boot = address_on(vready, vhost.ip)

    executors = {}
    for host in ehosts:
        _, url = start_mock(procs, host, f"mock-{host.label}")
        assert url.startswith("http://127.0.0.1:")
        _, ready = start_executor(procs, host, host.label, boot, url, [MODEL])
        # Every advertised address is the executor's own subnet IP.
        assert ready.listen and all(ip_of(a) == host.ip for a in ready.listen), ready.listen
        executors[ready.peer_id] = host
    ready_at = time.monotonic()

    found = find_providers(procs, chost, boot, MODEL)
    looked_up = time.monotonic()
    assert set(found) == set(executors), found
    for peer, addrs in found.items():
        assert addrs, f"no address found for {peer}"
        assert {ip_of(a) for a in addrs} == {executors[peer].ip}, (peer, addrs)

    used: collections.Counter[str] = collections.Counter()
    took = []
    for i in range(2):
        start = time.monotonic()
        answer = client_json(procs, chost, boot, MODEL, f"hi {i}")
        took.append(time.monotonic() - start)
        assert answer["text"] == f"Echo: hi {i}"
        assert answer["executor"] in executors, answer
        used[str(answer["executor"])] += 1
    print(
        f"network up in {ready_at - started:.1f} s, lookup {looked_up - ready_at:.1f} s, "
        f"client runs {', '.join(f'{t:.1f}' for t in took)} s; executors used: "
        f"{sorted(used.values())}"
    )
