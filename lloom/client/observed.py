"""What a client saw of each executor: strangers are ranked by their deeds, not their word.

Any peer can announce any model and zero load. So a client keeps, per executor, what it
observed itself — answers, failures, receipts it had to refuse, time to the first token,
tokens per second — and ranks by that ahead of announcements (:mod:`lloom.client.ranking`).
The book lives in the client's data dir (``executors.sqlite3``, mode 0600), so a gateway or
a CLI that restarts remembers who misbehaved.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from lloom.sqlite import open_private_db

#: Weight of the newest sample in the moving averages.
EWMA = 0.3
#: The book's file name in a client's data dir.
EXECUTOR_BOOK = "executors.sqlite3"


@dataclass(slots=True)
class Seen:
    """One executor as this client saw it."""

    successes: int = 0
    failures: int = 0
    #: Receipts this client refused: the executor asked to be paid for what it must not.
    refusals: int = 0
    ttft_ms: float | None = None
    tokens_per_s: float | None = None
    last_seen: float = 0.0

    @property
    def bad(self) -> int:
        """Failures and refused receipts."""
        return self.failures + self.refusals

    @property
    def unreliability(self) -> float:
        """Share of bad outcomes, from 0 (only good) towards 1; 0 when nothing is known."""
        return self.bad / (self.successes + self.bad + 1)

    def cost_ms(self) -> float | None:
        """Observed time to a useful answer: the first token plus 16 more, if measured."""
        if self.ttft_ms is None:
            return None
        per_token = 1000.0 / self.tokens_per_s if self.tokens_per_s else 0.0
        return self.ttft_ms + 16 * per_token


def _average(old: float | None, new: float) -> float:
    return new if old is None else (1 - EWMA) * old + EWMA * new


class ExecutorBook:
    """Observations per executor PeerId (as text); in memory, saved to SQLite on demand."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._seen: dict[str, Seen] = {}
        self._lock = threading.Lock()
        if path is not None and path.exists():
            self._load(path)

    def _connect(self, path: Path) -> sqlite3.Connection:
        return open_private_db(
            path,
            "CREATE TABLE IF NOT EXISTS seen (peer_id TEXT PRIMARY KEY, successes INTEGER, "
            "failures INTEGER, refusals INTEGER, ttft_ms REAL, tokens_per_s REAL, "
            "last_seen REAL);",
        )

    def _load(self, path: Path) -> None:
        db = self._connect(path)
        try:
            for peer, *values in db.execute("SELECT * FROM seen"):
                self._seen[str(peer)] = Seen(*values)
        finally:
            db.close()

    def save(self) -> None:
        """Write every observation to the book's file (if it has one)."""
        if self.path is None:
            return
        with self._lock:
            rows = [
                (p, s.successes, s.failures, s.refusals, s.ttft_ms, s.tokens_per_s, s.last_seen)
                for p, s in self._seen.items()
            ]
        db = self._connect(self.path)
        try:
            db.execute("BEGIN")
            db.executemany("INSERT OR REPLACE INTO seen VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
            db.execute("COMMIT")
        finally:
            db.close()

    def get(self, peer: str) -> Seen | None:
        """What was seen of ``peer``."""
        return self._seen.get(peer)

    def snapshot(self) -> dict[str, Seen]:
        """Everything seen, by PeerId."""
        with self._lock:
            return dict(self._seen)

    def _entry(self, peer: str) -> Seen:
        seen = self._seen.setdefault(peer, Seen())
        seen.last_seen = time.time()
        return seen

    def succeeded(
        self, peer: str, ttft_s: float | None = None, tokens: int = 0, stream_s: float = 0.0
    ) -> None:
        """An answer came: its time to first token and its tokens over the stream's time."""
        with self._lock:
            seen = self._entry(peer)
            seen.successes += 1
            if ttft_s is not None:
                seen.ttft_ms = _average(seen.ttft_ms, ttft_s * 1000)
            if tokens > 1 and stream_s > 0:
                seen.tokens_per_s = _average(seen.tokens_per_s, tokens / stream_s)

    def failed(self, peer: str) -> None:
        """The executor failed a request (error, broken stream, malformed answer)."""
        with self._lock:
            self._entry(peer).failures += 1

    def refused(self, peer: str) -> None:
        """This client refused the executor's receipt."""
        with self._lock:
            self._entry(peer).refusals += 1
