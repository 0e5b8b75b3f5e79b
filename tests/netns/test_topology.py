"""The namespace topology builder itself: subnets, NAT routers, port forwards, cable cuts,
multicast, teardown. Each test builds its own topology in well under a second."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.netns import Topology, available, netns_argv, topology
from tests.support.procs import Proc, Processes

pytestmark = pytest.mark.timeout(60)

PORT = 7000

#: A TCP server: prints ``listening``, then ``peer <ip> <port>`` per connection, ``recv <line>``
#: per line received.
SERVER = """
import socket, sys, threading
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen()
print("listening", flush=True)
def serve(c):
    for line in c.makefile():
        print("recv", line.strip(), flush=True)
while True:
    c, a = s.accept()
    print("peer", a[0], a[1], flush=True)
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

#: A TCP client: ``HOST PORT TIMEOUT [GO_FILE]``. Prints ``connected <own ip>``, or
#: ``timeout``, or the errno name of the failure. With ``GO_FILE``: once that file exists
#: it sends ``during-cut`` and reports how the connection reacts for 1 s (``silent``,
#: ``got <data>`` or an errno name), then keeps the connection open.
CLIENT = """
import errno, os, socket, sys, time
host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
try:
    s = socket.create_connection((host, port), timeout=timeout)
except TimeoutError:
    print("timeout", flush=True)
    sys.exit()
except OSError as e:
    print(errno.errorcode.get(e.errno or 0, str(e)), flush=True)
    sys.exit()
print("connected", s.getsockname()[0], flush=True)
s.sendall(b"hello\\n")
if len(sys.argv) > 4:
    while not os.path.exists(sys.argv[4]):
        time.sleep(0.02)
    s.sendall(b"during-cut\\n")
    s.settimeout(1.0)
    try:
        print("got", s.recv(100).decode() or "EOF", flush=True)
    except TimeoutError:
        print("silent", flush=True)
    except OSError as e:
        print(errno.errorcode.get(e.errno or 0, str(e)), flush=True)
    time.sleep(60)
"""


def serve(procs: Processes, net: Topology, host_label: str, port: int = PORT) -> Proc:
    """Start :data:`SERVER` in a host (through :class:`Processes`, by PID)."""
    host = net.hosts[host_label]
    proc = procs.start(
        f"server-{host_label}", netns_argv(host, [sys.executable, "-c", SERVER, str(port)])
    )
    proc.wait_for_line(lambda s: s == "listening", timeout=10)
    return proc


def connect(
    net: Topology, host_label: str, ip: str, port: int = PORT, timeout: float = 1.0
) -> tuple[str, float]:
    """Run :data:`CLIENT` in a host to completion: its verdict and how long it took."""
    start = time.monotonic()
    done = net.run(
        net.hosts[host_label], [sys.executable, "-c", CLIENT, ip, str(port), str(timeout)]
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split("\n")[0], time.monotonic() - start


def peer_line(server: Proc) -> str:
    """The address the server saw the next connection come from."""
    return server.wait_for_line(lambda s: s.startswith("peer "), timeout=10).split()[1]


def test_hosts_on_one_subnet_ping_each_other(net: Topology) -> None:
    if shutil.which("ping") is None:
        pytest.skip("`ping` is missing (Debian package iputils-ping)")
    lan = net.subnet("lan")
    a, b = net.host("a", lan), net.host("b", lan)
    assert a.ip != b.ip and {a.ip, b.ip} <= {str(h) for h in lan.network.hosts()}
    for src, dst in ((a, b), (b, a)):
        done = net.run(src, ["ping", "-c1", "-W1", dst.ip])
        assert done.returncode == 0, done.stdout + done.stderr


def test_host_behind_nat_is_seen_as_the_router(net: Topology, procs: Processes) -> None:
    wan, home = net.subnet("wan"), net.subnet("home")
    server = net.host("server", wan)
    router = net.router("router", wan, home, block_inbound=True)
    net.behind("pc", router)
    srv = serve(procs, net, "server")

    verdict, _ = connect(net, "pc", server.ip)

    assert verdict == f"connected {net.hosts['pc'].ip_on(home)}"
    assert peer_line(srv) == router.public_ip
    assert router.public_ip != net.hosts["pc"].ip


def test_outside_cannot_connect_in(net: Topology, procs: Processes) -> None:
    wan = net.subnet("wan")
    outside = net.host("outside", wan)
    open_router = net.router("open", wan, net.subnet("lan1"))
    home_router = net.router("home", wan, net.subnet("lan2"), block_inbound=True)
    net.behind("exposed", open_router)
    pc = net.behind("pc", home_router)
    serve(procs, net, "exposed")
    srv = serve(procs, net, "pc")

    # No route to a private subnet: fails at once.
    verdict, took = connect(net, "outside", pc.ip, timeout=5)
    assert verdict == "ENETUNREACH" and took < 2, (verdict, took)

    # With routes via the routers: the open one forwards, the home router drops silently.
    net.route(outside, str(open_router.private.subnet.network), open_router.public_ip)
    net.route(outside, str(home_router.private.subnet.network), home_router.public_ip)
    verdict, _ = connect(net, "outside", net.hosts["exposed"].ip)
    assert verdict.startswith("connected")
    verdict, _ = connect(net, "outside", pc.ip, timeout=1)
    assert verdict == "timeout"
    verdict, _ = connect(net, "outside", home_router.public_ip, timeout=1)
    assert verdict == "timeout"  # the router itself does not answer from outside either

    # Connections from inside still work, and their replies come back in.
    outsrv = serve(procs, net, "outside", PORT + 1)
    verdict, _ = connect(net, "pc", outside.ip, PORT + 1)
    assert verdict.startswith("connected")
    assert peer_line(outsrv) == home_router.public_ip
    assert not any(line.startswith("peer ") for line in srv.lines)


def test_forwarded_port_between_two_home_routers(net: Topology, procs: Processes) -> None:
    wan = net.subnet("wan")
    r1 = net.router("r1", wan, net.subnet("lan1"), block_inbound=True)
    r2 = net.router("r2", wan, net.subnet("lan2"), block_inbound=True)
    net.behind("a", r1)
    b = net.behind("b", r2)
    srv = serve(procs, net, "b")
    net.forward_port(r2, 4002, b, PORT)

    verdict, _ = connect(net, "a", r2.public_ip, 4002)

    assert verdict.startswith("connected")
    assert peer_line(srv) == r1.public_ip
    verdict, _ = connect(net, "a", r2.public_ip, 4003)
    assert verdict == "timeout"  # not forwarded: dropped


def test_masquerade_keeps_source_ports_unless_fully_random(net: Topology, procs: Processes) -> None:
    wan = net.subnet("wan")
    net.host("server", wan)
    keeping = net.router("keeping", wan, net.subnet("lan1"))
    scrambling = net.router("scrambling", wan, net.subnet("lan2"), masquerade="fully-random")
    net.behind("a", keeping)
    net.behind("b", scrambling)
    srv = serve(procs, net, "server")
    dial = """
import socket, sys
s = socket.socket()
s.bind(("0.0.0.0", 40000))
s.connect((sys.argv[1], int(sys.argv[2])))
"""
    seen = {}
    for label in ("a", "b"):
        done = net.run(
            net.hosts[label], [sys.executable, "-c", dial, net.hosts["server"].ip, str(PORT)]
        )
        assert done.returncode == 0, done.stderr
        line = srv.wait_for_line(lambda s: s.startswith("peer "), timeout=10)
        seen[label] = tuple(line.split()[1:])
    assert seen["a"] == (keeping.public_ip, "40000")  # port-preserving: hole punching works
    assert seen["b"][0] == scrambling.public_ip and seen["b"][1] != "40000"


def test_cut_is_silent_and_restore_delivers(
    net: Topology, procs: Processes, tmp_path: Path
) -> None:
    lan = net.subnet("lan")
    a, b = net.host("a", lan), net.host("b", lan)
    srv = serve(procs, net, "b")
    go = tmp_path / "go"
    client = procs.start(
        "client", netns_argv(a, [sys.executable, "-c", CLIENT, b.ip, str(PORT), "5", str(go)])
    )
    client.wait_for_line(lambda s: s.startswith("connected"), timeout=10)
    srv.wait_for_line(lambda s: s == "recv hello", timeout=10)

    net.cut(b.link_to(lan))
    assert connect(net, "a", b.ip, PORT + 1, timeout=0.5)[0] == "timeout"
    go.touch()
    # The established connection sees nothing: no RST, no FIN, sends succeed.
    assert client.wait_for_line(lambda s: True, timeout=10) == "silent"
    assert not any("during-cut" in line for line in srv.lines)

    net.restore(b.link_to(lan))
    start = time.monotonic()
    srv.wait_for_line(lambda s: s == "recv during-cut", timeout=15)  # retransmitted
    print(f"delivered {time.monotonic() - start:.2f} s after the restore")
    # A closed port answers with RST again once the cable is back.
    assert connect(net, "a", b.ip, PORT + 1)[0] == "ECONNREFUSED"


def test_host_side_cut_drops_routes_and_restore_reinstalls_them(
    net: Topology, procs: Processes
) -> None:
    wan, home = net.subnet("wan"), net.subnet("home")
    server = net.host("server", wan)
    pc = net.behind("pc", net.router("router", wan, home))
    serve(procs, net, "server")
    link = pc.link_to(home)

    net.cut(link, side="host")
    assert connect(net, "pc", server.ip)[0] == "ENETUNREACH"
    net.restore(link)
    assert connect(net, "pc", server.ip)[0].startswith("connected")


def test_multicast_crosses_one_bridge_only(net: Topology) -> None:
    lan, other = net.subnet("lan"), net.subnet("other")
    a, b, c = net.host("a", lan), net.host("b", lan), net.host("c", other)
    receiver = """
import socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("", 5353))
mreq = struct.pack("4s4s", socket.inet_aton("224.0.0.251"), socket.inet_aton(sys.argv[1]))
s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
s.settimeout(1)
print("joined", flush=True)
try:
    data, addr = s.recvfrom(100)
    print(addr[0], data.decode(), flush=True)
except TimeoutError:
    print("nothing", flush=True)
"""
    sender = """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.sendto(b"hi", ("224.0.0.251", 5353))
"""
    listeners = [net.popen(h, [sys.executable, "-c", receiver, h.ip]) for h in (b, c)]
    for proc in listeners:
        assert proc.stdout is not None and proc.stdout.readline() == b"joined\n"
    done = net.run(a, [sys.executable, "-c", sender])
    assert done.returncode == 0, done.stderr
    outputs = []
    for proc in listeners:
        assert proc.stdout is not None
        proc.wait(timeout=10)
        outputs.append(proc.stdout.read().decode().strip())
    assert outputs == [f"{a.ip} hi", "nothing"]


def test_teardown_removes_everything_even_on_failure() -> None:
    reason = available()
    if reason is not None:
        pytest.skip(reason)
    before = subprocess.run(
        ["ip", "-o", "link"], capture_output=True, text=True, check=False
    ).stdout
    prefix = ""
    with pytest.raises(RuntimeError, match="boom"), topology() as net:
        prefix = net.prefix
        wan, home = net.subnet("wan"), net.subnet("home")
        net.host("server", wan)
        net.behind("pc", net.router("router", wan, home, block_inbound=True))
        sleeper = net.popen(net.hosts["pc"], ["sleep", "60"])
        raise RuntimeError("boom")
    names = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=False
    ).stdout
    assert prefix and prefix not in names
    assert sleeper.returncode is not None
    after = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=False).stdout
    assert after == before  # the root namespace was never touched
