"""Start real lloom processes inside namespace hosts (through :class:`Processes`, so
teardown by PID works as for every e2e test)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lloom.devnet.tools import native_anvil
from lloom.readyline import ReadyLine
from tests.support.anvil import ANVIL
from tests.support.netns import Host, netns_argv
from tests.support.network import write_config
from tests.support.procs import Proc, Processes, script

#: Every interface, port chosen by the kernel.
WILDCARD = "/ip4/0.0.0.0/tcp/0"


def ip_of(multiaddr: str) -> str:
    """The IPv4 address of ``/ip4/<ip>/tcp/...``."""
    parts = multiaddr.split("/")
    if len(parts) < 3 or parts[1] != "ip4":
        raise ValueError(f"not an /ip4 address: {multiaddr}")
    return parts[2]


def address_on(ready: ReadyLine, ip: str) -> str:
    """The listen address of ``ready`` on ``ip`` (fails if the node does not list one)."""
    for addr in ready.listen:
        if ip_of(addr) == ip:
            return addr
    raise AssertionError(f"{ready.role} lists no address on {ip}: {ready.listen}")


def start_validator(
    procs: Processes, host: Host, name: str = "validator", listen: str = WILDCARD
) -> tuple[Proc, ReadyLine]:
    """``lloom-validator --listen-address LISTEN`` inside ``host``; its ready line."""
    argv = [script("lloom-validator"), "--listen-address", listen]
    proc = procs.start(name, netns_argv(host, argv))
    return proc, proc.wait_ready()


def start_mock(procs: Processes, host: Host, name: str = "mock") -> tuple[Proc, str]:
    """The mock OpenAI backend on the host's own 127.0.0.1; its /v1 URL."""
    argv = [sys.executable, "-m", "tests.support.mock_openai"]
    proc = procs.start(name, netns_argv(host, argv))
    line = proc.wait_for_line(lambda s: s.startswith("ready url="))
    return proc, line.removeprefix("ready url=")


def start_executor(
    procs: Processes,
    host: Host,
    name: str,
    bootstrap: str,
    backend_url: str,
    models: list[str],
    listen: str = WILDCARD,
    node_extra: str = "",
) -> tuple[Proc, ReadyLine]:
    """``lloom-executor --bootstrap-nodes … --config …`` inside ``host``, its config's
    ``[node] listen`` set to ``listen``; its ready line."""
    proc, _ = launch_executor(
        procs, host, name, bootstrap, backend_url, models, node_extra=node_extra, listen=listen
    )
    return proc, proc.wait_ready()


def find_providers(
    procs: Processes, host: Host, bootstrap: str, model: str, name: str = "lookup"
) -> dict[str, list[str]]:
    """What a client in ``host`` finds for ``model``: PeerId → advertised addresses."""
    argv = [sys.executable, "-m", "tests.netns.lookup", bootstrap, model]
    done = procs.run(name, netns_argv(host, argv), timeout=60)
    assert done.returncode == 0, done.stderr
    found: dict[str, list[str]] = json.loads(done.stdout)
    return found


def client_json(
    procs: Processes, host: Host, bootstrap: str, model: str, prompt: str, name: str = "client"
) -> dict[str, object]:
    """``lloom-client … --json`` inside ``host``; its JSON answer."""
    done = run_client(procs, host, bootstrap, model, prompt, "--json", name=name)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stderr}"
    answer: dict[str, object] = json.loads(done.stdout)
    return answer


def data_dir(procs: Processes, name: str) -> Path:
    """The data dir :class:`Processes` gives process ``name``."""
    return procs.root / name / "data"


# --- NAT scenarios (test_nat.py): validators with flags, executors that may fail to start,
# clients with chain flags, anvil inside a namespace host. ----------------------------------


def circuit_relay(addr: str) -> str:
    """The relay's PeerId of ``/…/p2p/<relay>/p2p-circuit/p2p/<target>``."""
    base, sep, _ = addr.partition("/p2p-circuit")
    if not sep or "/p2p/" not in base:
        raise ValueError(f"not a circuit address: {addr}")
    return base.rsplit("/p2p/", 1)[1]


def launch_validator(procs: Processes, host: Host, name: str, *flags: str) -> Proc:
    """``lloom-validator --listen-address 0.0.0.0:0 FLAGS…`` inside ``host`` (not awaited)."""
    argv = [script("lloom-validator"), "--listen-address", WILDCARD, *flags]
    return procs.start(name, netns_argv(host, argv))


def launch_executor(
    procs: Processes,
    host: Host,
    name: str,
    bootstrap: str,
    backend_url: str,
    models: list[str],
    *flags: str,
    extra: str = "",
    node_extra: str = "",
    listen: str = WILDCARD,
) -> tuple[Proc, Path]:
    """``lloom-executor`` inside ``host`` listening on ``listen`` (every interface by
    default), config sections ``extra`` (e.g. ``[chain]``) and ``node_extra`` (lines of
    ``[node]``), ``flags`` after the config (e.g. ``--private-key``, ``-v``). Not
    awaited: the caller waits for the ready line, or for the exit of an executor that must
    not start. Returns the process and its state dir (where ``usage.sqlite3`` lives)."""
    root = procs.root / name
    state = root / "state"
    config = write_config(
        root / "config.toml", backend_url, models, state, extra=extra, node_extra=node_extra
    )
    text = config.read_text()
    default = 'listen = ["/ip4/127.0.0.1/tcp/0"]'
    assert default in text, "write_config changed its listen line"
    config.write_text(text.replace(default, f'listen = ["{listen}"]'))
    argv = [
        script("lloom-executor"),
        "--bootstrap-nodes",
        bootstrap,
        "--config",
        str(config),
        *flags,
    ]
    return procs.start(name, netns_argv(host, argv)), state


def run_client(
    procs: Processes,
    host: Host,
    bootstrap: str,
    model: str,
    prompt: str,
    *flags: str,
    name: str = "client",
    timeout: float = 60.0,
) -> subprocess.CompletedProcess[str]:
    """``lloom-client --bootstrap-nodes … --model … --prompt … FLAGS…`` inside ``host``,
    run to completion whatever its exit code (``--timeout`` is ``timeout``; the process
    is killed 30 s after that)."""
    argv = [
        script("lloom-client"),
        *flags,
        "--bootstrap-nodes",
        bootstrap,
        "--model",
        model,
        "--prompt",
        prompt,
        "--timeout",
        f"{timeout:g}",
    ]
    return procs.run(name, netns_argv(host, argv), timeout=timeout + 30)


def start_anvil_at(procs: Processes, host: Host, ip: str, name: str = "anvil") -> tuple[Proc, str]:
    """anvil inside ``host``, listening on ``ip`` (an address other namespaces can route
    to, unlike :func:`tests.support.anvil.start_anvil`'s 127.0.0.1); its RPC URL."""
    if not ANVIL.exists():
        raise FileNotFoundError(f"{ANVIL} missing: run make npm (make test does)")
    home = procs.root / name / "home"
    home.mkdir(parents=True, exist_ok=True)
    argv = [str(native_anvil(ANVIL)), "--host", ip, "--port", "0", "--prune-history", "64"]
    proc = procs.start(name, netns_argv(host, argv), env={"HOME": str(home)})
    line = proc.wait_for_line(lambda s: s.startswith("Listening on "))
    return proc, "http://" + line.removeprefix("Listening on ").strip()


def run_lloom(
    procs: Processes, host: Host, name: str, *args: str, timeout: float = 60.0
) -> dict[str, Any]:
    """``lloom ARGS… --json`` inside ``host``; its JSON output (fails on a non-zero exit)."""
    done = procs.run(name, netns_argv(host, [script("lloom"), *args, "--json"]), timeout=timeout)
    assert done.returncode == 0, f"lloom {' '.join(args)}: exit {done.returncode}\n{done.stderr}"
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc


def chain_section(rpc: str, contract: str) -> str:
    """An executor's ``[chain]`` in verified mode (settles on SIGUSR1, not on a timer)."""
    return (
        f'[chain]\nrpc_url = "{rpc}"\ncontract_address = "{contract}"\n'
        'batch_interval_secs = 3600\nconfirmations = 1\nmode = "verified"\n'
    )


def usage_rows(state: Path) -> list[tuple[Any, ...]]:
    """``(client_address, model, prompt_tokens, completion_tokens, receipt, state)`` of
    every row of an executor's usage store."""
    db = sqlite3.connect(state / "usage.sqlite3")
    try:
        return db.execute(
            "SELECT client_address, model, prompt_tokens, completion_tokens, receipt, state "
            "FROM usage ORDER BY created_at"
        ).fetchall()
    finally:
        db.close()


# --- gateways and HTTP inside a namespace host (test_punch.py, test_cut.py) ---------------


def start_gateway_at(
    procs: Processes, host: Host, bootstrap: str, *flags: str, name: str = "gateway"
) -> tuple[Proc, str]:
    """``lloom-client gateway --listen 127.0.0.1:0 --bootstrap-nodes BOOTSTRAP FLAGS…``
    inside ``host``; the process and its base URL ``http://127.0.0.1:PORT`` (reachable
    only from inside ``host``)."""
    argv = [
        script("lloom-client"),
        "gateway",
        "--listen",
        "127.0.0.1:0",
        "--bootstrap-nodes",
        bootstrap,
        *flags,
    ]
    proc = procs.start(name, netns_argv(host, argv))
    ready = proc.wait_ready()
    assert ready.role == "gateway", ready
    return proc, f"http://{ready.get('http')}"


def http_json(
    procs: Processes,
    host: Host,
    url: str,
    body: dict[str, Any] | None = None,
    *,
    name: str = "curl",
    timeout: float = 60.0,
) -> tuple[int, Any]:
    """GET ``url`` (POST ``body`` as JSON when given) with curl inside ``host``; the HTTP
    status and the parsed JSON answer (None when the answer is not JSON)."""
    argv = ["curl", "-sS", "-m", f"{timeout:g}", "-w", "\n%{http_code}"]
    if body is not None:
        argv += ["-H", "content-type: application/json", "--data-binary", json.dumps(body)]
    done = procs.run(name, netns_argv(host, [*argv, url]), timeout=timeout + 10)
    assert done.returncode == 0, f"curl {url}: exit {done.returncode}\n{done.stderr}"
    text, _, status = done.stdout.rpartition("\n")
    try:
        answer: Any = json.loads(text)
    except ValueError:
        answer = None
    return int(status), answer


def chat(
    procs: Processes, host: Host, base: str, model: str, prompt: str, name: str = "chat"
) -> tuple[int, Any]:
    """A non-streamed ``/v1/chat/completions`` through the gateway at ``base``."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}]}
    return http_json(procs, host, f"{base}/v1/chat/completions", body, name=name)


def model_paths(procs: Processes, host: Host, base: str, model: str) -> dict[str, int] | None:
    """``paths`` of ``model`` in the gateway's ``/v1/models`` (None when not listed)."""
    status, doc = http_json(procs, host, f"{base}/v1/models", name="models", timeout=30)
    assert status == 200, (status, doc)
    for entry in doc["data"]:
        if entry["id"] == model:
            paths: dict[str, int] = entry["paths"]
            return paths
    return None


#: ``python -c LOAD_MAIN URL MODEL WORKERS PAUSE`` runs :func:`run_load`.
LOAD_MAIN = "import sys; from tests.netns.nodes import run_load; run_load(sys.argv[1:])"


def start_load(
    procs: Processes,
    host: Host,
    base: str,
    model: str,
    *,
    workers: int = 2,
    pause: float = 0.3,
    name: str = "load",
) -> Proc:
    """:func:`run_load` inside ``host`` against the gateway at ``base``, once it printed
    ``load started``. Stop it with SIGINT and wait for ``load done``."""
    argv = [sys.executable, "-c", LOAD_MAIN, base, model, str(workers), f"{pause:g}"]
    proc = procs.start(name, netns_argv(host, argv))
    proc.wait_for_line(lambda s: s == "load started")
    return proc


def _one_request(client: Any, base: str, model: str, worker: int, n: int) -> dict[str, Any]:
    """One streamed chat completion; what happened to it."""
    prompt = f"load {worker}-{n}"
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "stream": True,
        "temperature": 0,
    }
    record: dict[str, Any] = {"worker": worker, "n": n, "start": time.monotonic()}
    text, error = "", None
    try:
        with client.stream("POST", f"{base}/v1/chat/completions", json=body) as response:
            record["status"] = response.status_code
            record["request_id"] = response.headers.get("x-request-id")
            if response.status_code != 200:
                error = response.read().decode(errors="replace")
            else:
                done = False
                for line in response.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line.removeprefix("data: ")
                    if data == "[DONE]":
                        done = True
                        continue
                    event = json.loads(data)
                    if "error" in event:
                        error = json.dumps(event["error"])
                        continue
                    if "first" not in record:
                        record["first"] = time.monotonic() - record["start"]
                    for choice in event.get("choices", []):
                        text += (choice.get("delta") or {}).get("content") or ""
                if not done and error is None:
                    error = "stream ended without [DONE]"
    except Exception as exc:  # what the user would see: reported, not raised
        error = f"{type(exc).__name__}: {exc}"
    record["end"] = time.monotonic()
    record["latency"] = record["end"] - record["start"]
    record["text"] = text
    if text != f"Echo: {prompt}" and error is None:
        error = f"wrong answer {text!r}"
    record["error"] = error
    return record


def run_load(args: list[str]) -> None:
    """``URL MODEL WORKERS PAUSE``: WORKERS threads each send streamed chat completions
    to the gateway at URL one after another, PAUSE seconds apart, and print one JSON line
    per request (``worker``, ``n``, ``start``/``end`` on the system-wide monotonic clock,
    ``latency``, ``first`` (time to first chunk), ``status``, ``request_id``, ``text``,
    ``error``). Prints ``load started`` first; on SIGINT or SIGTERM the workers finish
    their request and ``load done`` ends the output."""
    import signal
    import threading

    import httpx

    base, model, workers, pause = args[0], args[1], int(args[2]), float(args[3])
    stop = threading.Event()
    out = threading.Lock()

    def on_signal(_signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    def work(worker: int) -> None:
        with httpx.Client(timeout=httpx.Timeout(120.0)) as client:
            n = 0
            while not stop.is_set():
                record = _one_request(client, base, model, worker, n)
                with out:
                    print(json.dumps(record), flush=True)
                n += 1
                stop.wait(pause)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(workers)]
    print("load started", flush=True)
    for thread in threads:
        thread.start()
    while any(t.is_alive() for t in threads):
        for thread in threads:
            thread.join(timeout=0.2)
    print("load done", flush=True)


def load_records(proc: Proc) -> list[dict[str, Any]]:
    """The per-request JSON lines :func:`run_load` printed so far."""
    return [json.loads(line) for line in list(proc.lines) if line.startswith("{")]


def served_request_ids(state: Path) -> set[str]:
    """The client request ids (a gateway's ``x-request-id``) in an executor's usage store."""
    db = sqlite3.connect(state / "usage.sqlite3")
    try:
        rows = db.execute(
            "SELECT client_request_id FROM usage WHERE client_request_id IS NOT NULL"
        ).fetchall()
    finally:
        db.close()
    return {str(row[0]) for row in rows}


#: ``python -c HANGING_MOCK_MAIN ARGS…``: the mock backend, except that a stream stops
#: after its ``finish_reason`` chunk (no usage chunk, no ``[DONE]``): an answer complete
#: for the user while the executor still waits for its backend's end.
HANGING_MOCK_MAIN = """
import sys
import trio
from tests.support import mock_openai

original = mock_openai._events

async def hanging(options, answer, with_usage):
    async for event in original(options, answer, with_usage):
        yield event
        if b'"finish_reason": "stop"' in event:
            await trio.sleep_forever()

mock_openai._events = hanging
sys.exit(mock_openai.main(sys.argv[1:]))
"""


def start_hanging_mock(procs: Processes, host: Host, name: str = "mock") -> tuple[Proc, str]:
    """:data:`HANGING_MOCK_MAIN` on the host's own 127.0.0.1; its /v1 URL."""
    proc = procs.start(name, netns_argv(host, [sys.executable, "-c", HANGING_MOCK_MAIN]))
    line = proc.wait_for_line(lambda s: s.startswith("ready url="))
    return proc, line.removeprefix("ready url=")


def start_stream(
    procs: Processes, host: Host, base: str, model: str, prompt: str, name: str = "stream"
) -> Proc:
    """A streamed ``/v1/chat/completions`` (temperature 0: resumable) through the gateway
    at ``base``, by curl inside ``host``; the Server-Sent Events are its stdout."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "stream": True,
        "temperature": 0,
    }
    argv = ["curl", "-sS", "-N", "-m", "60", "-H", "content-type: application/json"]
    argv += ["--data-binary", json.dumps(body), f"{base}/v1/chat/completions"]
    return procs.start(name, netns_argv(host, argv))
