"""``python -m bench``: run every benchmark and update docs/benchmarks.md."""

from __future__ import annotations

import sys

from bench import accounting, devnet, nat, node, request_path, scale, stream


def main() -> None:
    """Run all benchmarks in order, or the ones named on the command line."""
    suites = {
        "node": node.main,
        "request_path": request_path.main,
        "accounting": accounting.main,
        "devnet": devnet.main,
        "scale": scale.main,
        "nat": nat.main,
        "stream": stream.main,
    }
    for name in sys.argv[1:] or list(suites):
        suites[name]()


if __name__ == "__main__":
    main()
