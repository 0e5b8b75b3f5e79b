"""``make demo``: a local lloom network on a real small model, end to end.

1. starts ``lloom devnet`` (anvil, the Accounting contract, SmolLM2 on llama.cpp, a
   validator, an executor, a gateway) and waits for it to say it is ready;
2. sends one prompt through ``lloom-client``, printed as it streams;
3. asks the executor to settle now and waits for the settlement to be confirmed;
4. prints the on-chain usage table (``lloom usage``);
5. stops everything (also when a step fails or on Ctrl-C), by PID.

Exit code 0 only if every step worked.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

BIN = Path(sys.executable).parent
PROMPT = "In one sentence: why do people like to share things?"


class Devnet:
    """``lloom devnet`` in the background; its output echoed with a prefix."""

    def __init__(self, argv: list[str]) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            bufsize=1,
            start_new_session=True,  # Ctrl-C reaches the demo, which stops the devnet
        )
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            print(f"  devnet | {line.rstrip()}", flush=True)
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_for(self, prefix: str, timeout: float) -> str:
        """The next line starting with ``prefix``; fails at the deadline or if it exits."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:
                raise SystemExit(f"demo: lloom devnet exited (code {self.proc.wait()})")
            if line.startswith(prefix):
                return line
        raise SystemExit(f"demo: no {prefix!r} from lloom devnet within {timeout:.0f} s")

    def stop(self) -> int:
        """SIGINT (what Ctrl-C sends), then SIGKILL if it does not stop in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                return self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


def step(text: str) -> None:
    """A heading."""
    print(f"\n==> {text}", flush=True)


def main() -> int:
    """Run the demo; return the exit code."""
    parser = argparse.ArgumentParser(description="A local lloom network on a real model.")
    parser.add_argument("--data-dir", type=Path, default=Path(".demo"))
    parser.add_argument("--model-python", type=Path, required=True)
    parser.add_argument("--prompt", default=PROMPT)
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "LLOOM_PRIVATE_KEY"}

    step("starting a local lloom network (lloom devnet)")
    devnet = Devnet(
        [
            str(BIN / "lloom"),
            "devnet",
            "--data-dir",
            str(args.data_dir),
            "--model-python",
            str(args.model_python),
            # Ports chosen by the OS: the demo never clashes with what already runs here.
            "--rpc-port",
            "0",
            "--p2p-port",
            "0",
            "--gateway-port",
            "0",
        ]
    )
    try:
        devnet.wait_for("devnet ready", timeout=600)
        state = json.loads((args.data_dir / "devnet.json").read_text())
        running = state["running"]

        step(f"asking the network: {args.prompt!r} (lloom-client, streamed)")
        answered = subprocess.run(
            [
                str(BIN / "lloom-client"),
                "--bootstrap-nodes",
                running["validator"],
                "--key-file",
                running["cli_key_file"],
                "--chain-id",
                str(state["chain_id"]),
                "--contract",
                state["contract"],
                "--model",
                running["model"],
                "--prompt",
                args.prompt,
                "--max-tokens",
                "80",
            ],
            env={**env, "LLOOM_DATA_DIR": running["cli_data_dir"]},
            stdin=subprocess.DEVNULL,
            timeout=300,
            check=False,
        )
        if answered.returncode != 0:
            raise SystemExit(f"demo: lloom-client failed (exit code {answered.returncode})")

        step("settling usage on chain now (SIGUSR1 to the devnet)")
        os.kill(devnet.proc.pid, signal.SIGUSR1)
        devnet.wait_for("executor: settlement confirmed", timeout=120)

        step("usage recorded on the Accounting contract (lloom usage)")
        shown = subprocess.run(
            [
                str(BIN / "lloom"),
                "usage",
                "--rpc-url",
                running["rpc_url"],
                "--contract",
                state["contract"],
                "--executor",
                running["executor_address"],
            ],
            stdin=subprocess.DEVNULL,
            timeout=60,
            check=False,
        )
        if shown.returncode != 0:
            raise SystemExit(f"demo: lloom usage failed (exit code {shown.returncode})")
    finally:
        step("stopping the network")
        code = devnet.stop()
    if code != 0:
        print(f"demo: lloom devnet exited with code {code}", file=sys.stderr)
        return 1
    print("\ndemo: done. Run `make demo` again to reuse the chain and contract in .demo/.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
