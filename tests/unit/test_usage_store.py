"""The durable usage store."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from lloom.executor.usage import (
    MIGRATIONS,
    AsyncUsageStore,
    DuplicateUsage,
    UsageRecord,
    UsageStore,
    UsageStoreError,
)

ADDR = "0x" + "ab" * 20


def rec(i: int, client: str = ADDR) -> UsageRecord:
    return UsageRecord(f"req-{i}", client, "m", 10 + i, 5, 1000.0 + i)


def test_round_trip_and_totals(tmp_path: Path) -> None:
    with UsageStore(tmp_path / "u.db") as store:
        store.record(rec(1))
        store.record(rec(2, "0x" + "cd" * 20))
        assert store.get("req-1") == rec(1)
        assert store.get("nope") is None
        assert store.count() == 2
        assert store.all() == [rec(1), rec(2, "0x" + "cd" * 20)]
        assert store.totals_by_client() == {ADDR: 16, "0x" + "cd" * 20: 17}
        assert store.schema_version == len(MIGRATIONS) == 4


def test_duplicate_is_refused(tmp_path: Path) -> None:
    with UsageStore(tmp_path / "u.db") as store:
        store.record(rec(1))
        with pytest.raises(DuplicateUsage):
            store.record(rec(1))
        assert store.count() == 1


@pytest.mark.parametrize(
    "fields",
    [
        {"request_id": ""},
        {"client_address": "0x1234"},
        {"model": ""},
        {"prompt_tokens": -1},
        {"completion_tokens": 1.5},
        {"prompt_tokens": True},
    ],
)
def test_bad_records(fields: dict[str, object]) -> None:
    base: dict[str, object] = {
        "request_id": "r",
        "client_address": ADDR,
        "model": "m",
        "prompt_tokens": 1,
        "completion_tokens": 1,
        "created_at": 0.0,
    }
    with pytest.raises(UsageStoreError):
        UsageRecord(**(base | fields))  # type: ignore[arg-type]


def test_written_record_survives_a_killed_writer(tmp_path: Path) -> None:
    path = tmp_path / "u.db"
    code = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from lloom.executor.usage import UsageRecord, UsageStore\n"
        f"s = UsageStore(Path({str(path)!r}))\n"
        f"s.record(UsageRecord('killed', {ADDR!r}, 'm', 3, 4, 1.0))\n"
        "os.kill(os.getpid(), 9)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], check=False, timeout=60)
    assert result.returncode == -9
    with UsageStore(path) as store:
        assert store.get("killed") == UsageRecord("killed", ADDR, "m", 3, 4, 1.0)


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "u.db"
    UsageStore(path).close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version=99")
    db.close()
    with pytest.raises(UsageStoreError, match="newer"):
        UsageStore(path)


def test_unopenable_path(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UsageStoreError, match="cannot open"):
        UsageStore(blocker / "u.db")


async def test_async_sink(tmp_path: Path) -> None:
    with UsageStore(tmp_path / "u.db") as store:
        await AsyncUsageStore(store).record(rec(7), None)
        assert store.get("req-7") == rec(7)


def test_rows_keep_the_totals_asked_and_refuse_duplicates(tmp_path: Path) -> None:
    with UsageStore(tmp_path / "u.db") as store:
        store.record(rec(1), (11, 5))
        store.record(rec(2))
        with pytest.raises(DuplicateUsage):
            store.record(rec(2), (99, 99))
        rows = store.execute("SELECT request_id, prompt_total, completion_total FROM usage")
        assert sorted(rows) == [("req-1", 11, 5), ("req-2", None, None)]


def test_version_1_file_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "u.db"
    db = sqlite3.connect(path)
    db.executescript(MIGRATIONS[0] + "PRAGMA user_version=1;")
    db.execute("INSERT INTO usage VALUES ('old', ?, 'm', 1, 2, 0.0)", (ADDR,))
    db.commit()
    db.close()
    with UsageStore(path) as store:
        assert store.schema_version == len(MIGRATIONS)
        assert store.get("old") == UsageRecord("old", ADDR, "m", 1, 2, 0.0)
        store.record(rec(1))
        assert store.count() == 2


def test_open_rows_grow_then_end_complete_or_partial(tmp_path: Path) -> None:
    """A streaming answer's checkpoints update one open row; the end completes it, a break
    keeps it as partial, and a row that ended is never changed by a late checkpoint."""
    with UsageStore(tmp_path / "u.db") as store:
        growing = rec(1)
        store.progress(growing)
        store.progress(UsageRecord("req-1", ADDR, "m", 11, 9, 1001.0))
        assert store.state("req-1") == "open" and store.get("req-1").completion_tokens == 9  # type: ignore[union-attr]
        store.record(UsageRecord("req-1", ADDR, "m", 11, 12, 1001.0), (11, 12))
        assert store.state("req-1") == "complete"
        store.progress(UsageRecord("req-1", ADDR, "m", 11, 1, 1001.0))  # too late: ignored
        assert store.get("req-1").completion_tokens == 12  # type: ignore[union-attr]
        with pytest.raises(DuplicateUsage):
            store.record(rec(1))
        store.progress(rec(2))
        store.progress(UsageRecord("req-2", ADDR, "m", 12, 7, 1002.0), final=True)
        assert store.state("req-2") == "partial"
        assert store.get("req-2").completion_tokens == 7  # type: ignore[union-attr]
        assert store.state("nope") is None


def test_open_rows_of_a_dead_process_become_partial(tmp_path: Path) -> None:
    """What a killed executor checkpointed is kept, marked partial at the next start, and
    only then offered to settlement."""
    with UsageStore(tmp_path / "u.db") as store:
        store.progress(rec(1))
        store.record(rec(2))
    with UsageStore(tmp_path / "u.db") as store:
        assert store.close_open() == 1
        assert store.state("req-1") == "partial" and store.state("req-2") == "complete"
        assert store.close_open() == 0


async def test_rows_stored_at_once_share_transactions_and_each_caller_hears_its_own(
    tmp_path: Path,
) -> None:
    with UsageStore(tmp_path / "u.db") as store:
        store.record(rec(0))
        batches: list[int] = []
        upsert_many = store.upsert_many

        def counted(rows: list[Any]) -> list[bool]:
            batches.append(len(rows))
            return upsert_many(rows)

        store.upsert_many = counted  # type: ignore[method-assign]
        sink = AsyncUsageStore(store)
        outcomes: dict[int, str] = {}

        async def one(i: int) -> None:
            try:
                await sink.record(rec(i), None)
                outcomes[i] = "stored"
            except DuplicateUsage:
                outcomes[i] = "duplicate"

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for i in range(40):
                    nursery.start_soon(one, i)
        assert outcomes == {0: "duplicate"} | {i: "stored" for i in range(1, 40)}
        assert sum(batches) == 40 and len(batches) < 40  # grouped, none lost
        assert store.count() == 40


async def test_a_failed_transaction_fails_every_row_in_it(tmp_path: Path) -> None:
    with UsageStore(tmp_path / "u.db") as store:

        def broken(rows: list[Any]) -> list[bool]:
            raise UsageStoreError("disk full")

        store.upsert_many = broken  # type: ignore[method-assign]
        sink = AsyncUsageStore(store)
        failures: list[str] = []

        async def one(i: int) -> None:
            try:
                await sink.progress(rec(i))
            except UsageStoreError as exc:
                failures.append(str(exc))

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for i in range(5):
                    nursery.start_soon(one, i)
        assert failures == ["disk full"] * 5


async def test_callers_cancelled_mid_write_strand_no_row_and_no_other_caller(
    tmp_path: Path,
) -> None:
    with UsageStore(tmp_path / "u.db") as store:
        upsert_many = store.upsert_many

        def slow(rows: list[Any]) -> list[bool]:
            time.sleep(0.02)
            return upsert_many(rows)

        store.upsert_many = slow  # type: ignore[method-assign]
        sink = AsyncUsageStore(store)
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for i in range(10):  # checkpoints of answers that end (are cancelled) at once
                    scope = trio.CancelScope(deadline=trio.current_time() + 0.01)

                    async def checkpoint(i: int = i, scope: trio.CancelScope = scope) -> None:
                        with scope:
                            await sink.progress(rec(i))
                            await trio.sleep_forever()

                    nursery.start_soon(checkpoint)
                    await trio.sleep(0.003)
            await sink.record(rec(99), None)  # the store still works afterwards
        assert store.count() == 11
