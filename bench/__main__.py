"""``python -m bench``: run every benchmark and update docs/benchmarks.md."""

from __future__ import annotations

from bench import node


def main() -> None:
    """Run all benchmarks in order."""
    node.main()


if __name__ == "__main__":
    main()
