"""The executor's durable usage store: SQLite in the executor's data dir.

Every completed request is written and committed (WAL, ``synchronous=FULL``) before the
client is told the request ended, so an answered request survives a SIGKILL right after.
A streamed answer is also checkpointed while it runs (an ``open`` row, about once a second)
and a broken-off one is kept as ``partial``: what an executor delivered is never lost, not
even when it is killed mid-answer.
The schema is versioned with ``PRAGMA user_version``; :data:`MIGRATIONS` upgrades older
files in place. The API is synchronous and thread-safe: async callers run it in a worker
thread (:class:`AsyncUsageStore`).
"""

from __future__ import annotations

import re
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import trio

from lloom.errors import StoreError
from lloom.paths import private_file
from lloom.protocol.llm import ReceiptRequest

_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")

#: Schema migrations; entry ``i`` upgrades a file from version ``i`` to ``i + 1``.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE usage (
        request_id        TEXT PRIMARY KEY,
        client_address    TEXT NOT NULL,
        model             TEXT NOT NULL,
        prompt_tokens     INTEGER NOT NULL CHECK (prompt_tokens >= 0),
        completion_tokens INTEGER NOT NULL CHECK (completion_tokens >= 0),
        created_at        REAL NOT NULL
    );
    CREATE INDEX usage_by_client ON usage (client_address);
    """,
    """
    ALTER TABLE usage ADD COLUMN prompt_total INTEGER;
    ALTER TABLE usage ADD COLUMN completion_total INTEGER;
    ALTER TABLE usage ADD COLUMN receipt TEXT;
    ALTER TABLE usage ADD COLUMN settlement_id INTEGER;
    CREATE TABLE channels (
        client_address   TEXT NOT NULL,
        model            TEXT NOT NULL,
        prompt_total     INTEGER NOT NULL,
        completion_total INTEGER NOT NULL,
        PRIMARY KEY (client_address, model)
    );
    CREATE TABLE receipts (
        client_address   TEXT NOT NULL,
        model            TEXT NOT NULL,
        prompt_total     INTEGER NOT NULL,
        completion_total INTEGER NOT NULL,
        deadline         INTEGER NOT NULL,
        signature        BLOB NOT NULL,
        PRIMARY KEY (client_address, model)
    );
    CREATE TABLE settlements (
        id           INTEGER PRIMARY KEY AUTOINCREMENT,
        mode         TEXT NOT NULL,
        nonce        INTEGER NOT NULL,
        tx_hash      TEXT NOT NULL UNIQUE,
        raw_tx       BLOB NOT NULL,
        status       TEXT NOT NULL,
        items        TEXT NOT NULL,
        created_at   REAL NOT NULL,
        block_number INTEGER,
        block_hash   TEXT
    );
    """,
    """
    CREATE TABLE chain_meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    ALTER TABLE usage ADD COLUMN client_request_id TEXT;
    """,
    """
    ALTER TABLE usage ADD COLUMN state TEXT NOT NULL DEFAULT 'complete';
    """,
)

#: A row's ``state``: an answer that ended with ``end``; one still being streamed (its
#: counts are what it delivered at the last checkpoint); one broken off (what it delivered).
COMPLETE, OPEN, PARTIAL = "complete", "open", "partial"


class UsageStoreError(StoreError):
    """The usage store refused a record or could not be opened."""


class DuplicateUsage(UsageStoreError):
    """A record with this request id is already stored."""


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One completed request."""

    request_id: str
    client_address: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    created_at: float
    #: The client's own id of the request (a gateway's ``x-request-id``), if it sent one.
    client_request_id: str | None = None

    def __post_init__(self) -> None:
        if not self.request_id:
            raise UsageStoreError("usage record needs a request id")
        if not _ADDRESS.fullmatch(self.client_address):
            raise UsageStoreError(f"bad client address {self.client_address!r}")
        if not self.model:
            raise UsageStoreError("usage record needs a model")
        for name in ("prompt_tokens", "completion_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise UsageStoreError(f"{name} must be a non-negative integer")

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens


_COLUMNS = (
    "request_id, client_address, model, prompt_tokens, completion_tokens, created_at, "
    "client_request_id"
)


#: One row to store: the record, its state, the running totals asked to be signed.
Row = tuple[UsageRecord, str, tuple[int, int] | None]


class UsageStore:
    """SQLite-backed, thread-safe usage records."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            private_file(path)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=5000")
        except (OSError, sqlite3.Error) as exc:
            raise UsageStoreError(f"cannot open usage store {path}: {exc}") from None
        self._lock = threading.Lock()
        self._migrate()

    def _migrate(self) -> None:
        with self._lock:
            version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
            if version > len(MIGRATIONS):
                raise UsageStoreError(
                    f"{self.path} has schema version {version}, newer than this lloom"
                )
            for number in range(version, len(MIGRATIONS)):
                # One script per step: the schema change and its version land together.
                step = MIGRATIONS[number]
                self._db.executescript(
                    f"BEGIN IMMEDIATE; {step} PRAGMA user_version={number + 1}; COMMIT;"
                )

    @property
    def schema_version(self) -> int:
        """The schema version of the open file."""
        with self._lock:
            return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def record(self, rec: UsageRecord, totals: tuple[int, int] | None = None) -> None:
        """Store ``rec`` durably, with the running (prompt, completion) ``totals`` the
        client was asked to sign for it (none without verified accounting).

        Raises :class:`DuplicateUsage` for a known request id.
        """
        if not self._upsert(rec, COMPLETE, totals):
            raise DuplicateUsage(f"request {rec.request_id} is already recorded")

    def progress(self, rec: UsageRecord, final: bool = False) -> None:
        """Store what an answer still being streamed delivered so far (an ``open`` row,
        kept until the answer ends), or, when ``final``, what a broken-off answer delivered
        (a ``partial`` row). A row that already ended is left alone."""
        self._upsert(rec, PARTIAL if final else OPEN, None)

    def close_open(self) -> int:
        """Mark rows left ``open`` by a process that died mid-answer as ``partial`` (their
        counts are the last checkpoint's); return how many."""
        with self._lock, self._transaction():
            cursor = self._db.execute("UPDATE usage SET state = ? WHERE state = ?", (PARTIAL, OPEN))
            return int(cursor.rowcount)

    def _upsert(self, rec: UsageRecord, state: str, totals: tuple[int, int] | None) -> bool:
        """Insert ``rec``, or update its row while that is ``open``; whether it was stored."""
        return self.upsert_many([(rec, state, totals)])[0]

    def upsert_many(self, rows: list[Row]) -> list[bool]:
        """Store ``rows`` (record, state, signed totals) in one transaction: each inserted,
        or updating its row while that is ``open``; whether each was stored."""
        with self._lock, self._transaction():
            return [self._upsert_row(*row) for row in rows]

    def _upsert_row(self, rec: UsageRecord, state: str, totals: tuple[int, int] | None) -> bool:
        prompt_total, completion_total = totals if totals is not None else (None, None)
        cursor = self._db.execute(
            f"INSERT INTO usage ({_COLUMNS}, prompt_total, completion_total, state) "  # noqa: S608
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (request_id) DO UPDATE SET "
            "prompt_tokens = excluded.prompt_tokens, "
            "completion_tokens = excluded.completion_tokens, "
            "prompt_total = excluded.prompt_total, "
            "completion_total = excluded.completion_total, state = excluded.state "
            "WHERE usage.state = 'open'",
            (
                rec.request_id,
                rec.client_address,
                rec.model,
                rec.prompt_tokens,
                rec.completion_tokens,
                rec.created_at,
                rec.client_request_id,
                prompt_total,
                completion_total,
                state,
            ),
        )
        return cursor.rowcount > 0

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def execute(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        """Run one statement (its own transaction) and return its rows."""
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Several statements in one transaction, under the store's lock."""
        with self._lock, self._transaction():
            yield self._db

    def state(self, request_id: str) -> str | None:
        """The ``state`` of a row (complete, open or partial), if it exists."""
        rows = self.execute("SELECT state FROM usage WHERE request_id = ?", (request_id,))
        return str(rows[0][0]) if rows else None

    def get(self, request_id: str) -> UsageRecord | None:
        """The record of ``request_id``, if any."""
        with self._lock:
            row = self._db.execute(
                f"SELECT {_COLUMNS} FROM usage WHERE request_id = ?",  # noqa: S608
                (request_id,),
            ).fetchone()
        return UsageRecord(*row) if row else None

    def all(self) -> list[UsageRecord]:
        """Every record, oldest first."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM usage ORDER BY created_at, request_id"  # noqa: S608
            ).fetchall()
        return [UsageRecord(*row) for row in rows]

    def count(self) -> int:
        """Number of records."""
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM usage").fetchone()[0])

    def totals_by_client(self) -> dict[str, int]:
        """Total tokens per client address."""
        with self._lock:
            rows = self._db.execute(
                "SELECT client_address, SUM(prompt_tokens + completion_tokens) "
                "FROM usage GROUP BY client_address"
            ).fetchall()
        return {addr: int(total) for addr, total in rows}

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> UsageStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _Batch:
    """Rows written in one transaction; ``done`` is set once they are durable (or not)."""

    __slots__ = ("done", "error", "results")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.results: list[bool] = []
        self.error: BaseException | None = None


class AsyncUsageStore:
    """The :class:`UsageSink` of the request handler: records in a worker thread, as a
    group commit — rows that come while a transaction is being written go together in the
    next one (one fsync for all of them, not one each: 64 answers streaming at once
    checkpoint and end 128 times a second). A lone row is written at once, and every
    caller returns only once its own row is durable, or gets the error."""

    def __init__(self, store: UsageStore) -> None:
        self.store = store
        self._queue: list[Row] = []
        self._next = _Batch()
        self._writing = False
        self._written = trio.Event()

    async def record(self, rec: UsageRecord, asked: ReceiptRequest | None) -> None:
        """Store ``rec`` durably without blocking the event loop; raises
        :class:`DuplicateUsage` for a known request id."""
        totals = None if asked is None else (asked.prompt_total, asked.completion_total)
        if not await self._upsert((rec, COMPLETE, totals)):
            raise DuplicateUsage(f"request {rec.request_id} is already recorded")

    async def progress(self, rec: UsageRecord, final: bool = False) -> None:
        """Store what an unfinished answer delivered so far (see :meth:`UsageStore.progress`)."""
        await self._upsert((rec, PARTIAL if final else OPEN, None))

    async def _upsert(self, row: Row) -> bool:
        # Not cancellable, as a plain ``to_thread.run_sync`` is not: a caller returns once
        # its row is durable (or failed), and no batch is left half-handled.
        with trio.CancelScope(shield=True):
            self._queue.append(row)
            index, batch = len(self._queue) - 1, self._next
            while not batch.done.is_set():
                if self._writing:  # ours goes in the transaction after this one
                    await self._written.wait()
                else:
                    await self._write_queued()
        if batch.error is not None:
            raise batch.error
        return batch.results[index]

    async def _write_queued(self) -> None:
        """Write every queued row in one transaction (the next writer is whichever
        waiting caller runs first after it)."""
        self._writing = True
        current, self._next = self._next, _Batch()
        rows, self._queue = self._queue, []
        try:
            current.results = await trio.to_thread.run_sync(self.store.upsert_many, rows)
        except Exception as exc:  # every row of the batch failed with it
            current.error = exc
        finally:
            self._writing = False
            current.done.set()
            self._written.set()
            self._written = trio.Event()
