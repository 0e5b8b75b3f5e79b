"""Node-layer benchmark: dial + handshake, request/response round trip, provider lookup.

A validator runs as its own process (``lloom-validator``); the provider and the client are
hosts in this process. Everything is on 127.0.0.1.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.peerinfo import info_from_p2p_addr
from multiaddr import Multiaddr

from bench.report import STATS_HEADER, Stats, write_section
from lloom.dhtkeys import executor_role_key
from lloom.identity import Identity
from lloom.logs import configure_logging
from lloom.node.node import NodeConfig, open_node
from lloom.node.streams import FramedStream
from lloom.readyline import ReadyLine

ECHO = TProtocol("/lloom/bench-echo/1")
DIALS = 200
ROUND_TRIPS = 2000
NEW_STREAM_TRIPS = 500
LOOKUPS = 200


def start_validator(tmp: Path) -> tuple[subprocess.Popen[str], ReadyLine]:
    """Start ``lloom-validator`` and read its ready line."""
    exe = Path(sys.executable).parent / "lloom-validator"
    proc = subprocess.Popen(
        [str(exe), "--listen-address", "/ip4/127.0.0.1/tcp/0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={"LLOOM_DATA_DIR": str(tmp), "PATH": "/usr/bin:/bin"},
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("ready "):
            return proc, ReadyLine.parse(line)
    raise RuntimeError("validator exited before it was ready")


async def echo_handler(stream: INetStream) -> None:
    framed = FramedStream(stream)
    while (frame := await framed.read_frame()) is not None:
        await framed.write_frame(frame)
    await framed.close()


async def measure(boot: str) -> dict[str, Stats]:
    """Run every measurement against the validator at ``boot``."""
    results: dict[str, Stats] = {}
    key = executor_role_key()
    config = NodeConfig(bootstrap=[Multiaddr(boot)])
    async with (
        open_node(Identity.generate(), config) as provider,
        open_node(Identity.generate(), config) as client,
    ):
        provider.host.set_stream_handler(ECHO, echo_handler)
        target = info_from_p2p_addr(Multiaddr(provider.listen_multiaddrs()[0]))

        dials = []
        for _ in range(DIALS):
            start = time.perf_counter()
            await client.host.connect(target)
            dials.append(time.perf_counter() - start)
            await client.host.get_network().close_peer(target.peer_id)
        results["dial + Noise + Yamux (new connection)"] = Stats.of(dials)

        await client.host.connect(target)
        raw = await client.host.new_stream(target.peer_id, [ECHO])
        framed = FramedStream(raw)
        payload = b"x" * 256
        trips = []
        for _ in range(ROUND_TRIPS):
            start = time.perf_counter()
            await framed.write_frame(payload)
            await framed.read_frame()
            trips.append(time.perf_counter() - start)
        await framed.close()
        results["request/response, warm stream (256 B)"] = Stats.of(trips)

        fresh = []
        for _ in range(NEW_STREAM_TRIPS):
            start = time.perf_counter()
            s = FramedStream(await client.host.new_stream(target.peer_id, [ECHO]))
            await s.write_frame(payload)
            await s.read_frame()
            fresh.append(time.perf_counter() - start)
            await s.close()
        results["request/response, new stream per request"] = Stats.of(fresh)

        assert await provider.dht.provide(key)
        lookups = []
        for _ in range(LOOKUPS):
            start = time.perf_counter()
            found = await client.dht.find_providers(key)
            lookups.append(time.perf_counter() - start)
            assert [p.peer_id for p in found] == [provider.peer_id]
        results["provider lookup through one validator"] = Stats.of(lookups)
    return results


def main() -> None:
    """Run the node benchmark and write its section."""
    configure_logging(0)
    with tempfile.TemporaryDirectory() as tmp:
        proc, ready = start_validator(Path(tmp))
        try:
            results = trio.run(measure, ready.listen[0])
        finally:
            proc.terminate()
            proc.wait(10)
    rows = "\n".join(s.row(name) for name, s in results.items())
    body = f"""
Validator in its own process; provider and client hosts in the benchmark process; all on
127.0.0.1. Dial = TCP connect + multistream + Noise XX + Yamux, a new connection each time.
Round trips are one 256-byte frame each way over lloom's framing. Lookups ask the network
(never the local cache) and check the answer.

{STATS_HEADER}
{rows}
"""
    write_section("Node layer", body)
    print(body)
