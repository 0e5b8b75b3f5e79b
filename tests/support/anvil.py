"""A throwaway anvil chain for tests (npm @foundry-rs/anvil, installed by make)."""

from __future__ import annotations

from pathlib import Path

from lloom.devnet.tools import native_anvil
from tests.support.procs import Proc, Processes

ROOT = Path(__file__).resolve().parents[2]
ANVIL = ROOT / "node_modules" / ".bin" / "anvil"

#: The chain id anvil runs with by default.
ANVIL_CHAIN_ID = 31337

#: anvil's well-known dev keys (mnemonic "test test ... junk").
KEYS = [
    "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80",
    "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d",
    "0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a",
    "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6",
]


def start_anvil(
    procs: Processes, name: str = "anvil", *flags: str, port: int = 0
) -> tuple[Proc, str]:
    """Start anvil on 127.0.0.1 (history pruned to 64 states, enough for reorg tests; its
    own HOME); return it and its RPC URL."""
    if not ANVIL.exists():
        raise FileNotFoundError(f"{ANVIL} missing: run make npm (make test does)")
    # The binary itself, not npm's node wrapper: a killed wrapper would leave it running.
    home = procs.root / name / "home"
    home.mkdir(parents=True, exist_ok=True)
    proc = procs.start(
        name,
        [
            str(native_anvil(ANVIL)),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--prune-history",
            "64",
            *flags,
        ],
        env={"HOME": str(home)},
    )
    line = proc.wait_for_line(lambda s: s.startswith("Listening on "))
    return proc, "http://" + line.removeprefix("Listening on ").strip()
