"""Statistics and the docs/benchmarks.md writer shared by every benchmark."""

from __future__ import annotations

import datetime
import os
import platform
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


@dataclass(frozen=True)
class Stats:
    """Summary of a list of durations, in milliseconds."""

    n: int
    p50: float
    p90: float
    p99: float
    mean: float

    @classmethod
    def of(cls, seconds: list[float]) -> Stats:
        """Summarise durations given in seconds."""
        ms = sorted(s * 1000 for s in seconds)
        q = statistics.quantiles(ms, n=100, method="inclusive") if len(ms) > 1 else ms * 99
        return cls(len(ms), q[49], q[89], q[98], statistics.fmean(ms))

    def row(self, name: str) -> str:
        """A markdown table row."""
        return (
            f"| {name} | {self.n} | {self.p50:.2f} | {self.p90:.2f} | {self.p99:.2f} "
            f"| {self.mean:.2f} |"
        )


STATS_HEADER = "| measurement | n | p50 ms | p90 ms | p99 ms | mean ms |\n|---|---|---|---|---|---|"


def machine() -> str:
    """One line describing this machine."""
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 1024 / 1024:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores{mem}, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section ``name`` of docs/benchmarks.md."""
    DOC.parent.mkdir(parents=True, exist_ok=True)
    text = (
        DOC.read_text()
        if DOC.exists()
        else (
            "# Benchmarks\n\nWritten by `make bench`; each section is replaced when its "
            "benchmark runs again. Numbers are from the machine named in each section.\n"
        )
    )
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    block = (
        f"<!-- bench:{name} -->\n## {name}\n\n_Measured {stamp} on {machine()}._\n\n"
        f"{body.strip()}\n<!-- /bench:{name} -->\n"
    )
    pattern = re.compile(
        rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->\n", re.S
    )
    text = pattern.sub(lambda _m: block, text) if pattern.search(text) else text + "\n" + block
    DOC.write_text(text)
